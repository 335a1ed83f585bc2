use expect_test::expect;
use proptest::prelude::*;

use super::*;

/// Bytes as kiln-net's tests printed them: one hex pair per byte.
fn hex_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// Bytes as kiln-guest's tests printed them: one hex group per 4-byte word.
fn hex_words(bytes: &[u8]) -> String {
    bytes
        .chunks(4)
        .map(|word| word.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join(" ")
}

fn address(seq: u32, index: u32, address: Ipv4Addr, prefix_len: u8, if_exists: IfExists) -> Vec<u8> {
    Request::AddAddress { index, address, prefix_len, if_exists }.encode(seq)
}

// Moved from kiln-net's netlink.rs: the tap's requests (the address replaced if it exists).
#[test]
fn messages_match_rtnetlink_layout() {
    // Little-endian host assumed by the literals (x86_64).
    assert_eq!(
        hex_bytes(&Request::LinkUp { index: 3, mtu: Some(1400) }.encode(7)),
        "28 00 00 00 10 00 05 00 07 00 00 00 00 00 00 00 \
         00 00 00 00 03 00 00 00 01 00 00 00 01 00 00 00 \
         08 00 04 00 78 05 00 00"
    );
    assert_eq!(hex_bytes(&Request::LinkUp { index: 9, mtu: None }.encode(1)).len(), 32 * 3 - 1);
    assert_eq!(
        hex_bytes(&address(2, 3, Ipv4Addr::new(10, 0, 0, 1), 30, IfExists::Replace)),
        "28 00 00 00 14 00 05 05 02 00 00 00 00 00 00 00 \
         02 1e 00 00 03 00 00 00 08 00 02 00 0a 00 00 01 \
         08 00 01 00 0a 00 00 01"
    );
}

// Moved from kiln-guest's netlink.rs: kiln-init's requests (an existing address is an error).
#[test]
fn requests() {
    // Compared with `ip -d monitor`-style dumps of what iproute2 sends.
    expect!["20000000 10000500 07000000 00000000 00000000 02000000 01000000 01000000"]
        .assert_eq(&hex_words(&Request::LinkUp { index: 2, mtu: None }.encode(7)));
    expect!["28000000 14000506 08000000 00000000 02180000 02000000 08000200 0a00020f 08000100 0a00020f"]
        .assert_eq(&hex_words(&address(8, 2, Ipv4Addr::new(10, 0, 2, 15), 24, IfExists::Fail)));
    expect!["2c000000 18000506 09000000 00000000 02000000 fe030001 00000000 08000500 0a000202 08000400 02000000"]
        .assert_eq(&hex_words(&Request::AddDefaultRoute { index: 2, gateway: Ipv4Addr::new(10, 0, 2, 2) }.encode(9)));
}

#[test]
fn acks_are_found_by_sequence_and_malformed_replies_named() {
    assert_eq!(find_ack(&ack_message(5, 0), 5), Ok(Some(Ack::Accepted)));
    assert_eq!(find_ack(&ack_message(5, 17), 5), Ok(Some(Ack::Refused(17))));
    assert_eq!(find_ack(&[ack_message(4, 0), ack_message(5, 1)].concat(), 5), Ok(Some(Ack::Refused(1))));
    assert_eq!(find_ack(&ack_message(4, 0), 5), Ok(None));
    assert_eq!(find_ack(&[0xff; 7], 5), Ok(None), "a tail shorter than a header is no message");
    assert_eq!(find_ack(&[0; 32], 5), Err(Error::MessageLength { len: 0, left: 32 }));
    let short = MessageBuilder::new(NLMSG_ERROR, 0, 5).bytes(&[0; 2]).finish();
    expect!["error message without an error code"].assert_eq(&find_ack(&short, 5).unwrap_err().to_string());
}

#[test]
fn decoding_refuses_what_kiln_does_not_send() {
    let check = |bytes: &[u8], expected: expect_test::Expect| {
        expected.assert_eq(&Request::decode(bytes).unwrap_err().to_string());
    };
    check(&[], expect!["not a request kiln sends: 0 bytes hold no message"]);
    check(&ack_message(1, 0), expect!["not a request kiln sends: message type 2"]);
    let mut link = Request::LinkUp { index: 2, mtu: None }.encode(1);
    link[24] = 0; // ifi_flags: not IFF_UP
    check(&link, expect!["not a request kiln sends: LinkUp { index: 2, mtu: None } is encoded otherwise"]);
    let route = MessageBuilder::new(RTM_NEWROUTE, 0, 1).bytes(&[0; 12]).attribute(RTA_OIF, &[2, 0]).finish();
    check(&route, expect!["not a request kiln sends: attribute types [4]"]);
    let truncated = MessageBuilder::new(RTM_NEWADDR, 0, 1).bytes(&[0; 4]).finish();
    check(&truncated, expect!["not a request kiln sends: a 4-byte payload for a 8-byte header"]);
    let bad_attribute = MessageBuilder::new(RTM_NEWLINK, 0, 1).bytes(&[0; 16]).bytes(&[9, 0, 4, 0]).finish();
    check(&bad_attribute, expect!["attribute length 9 with 4 bytes left"]);
}

fn any_request() -> impl Strategy<Value = Request> {
    let ip = any::<u32>().prop_map(Ipv4Addr::from);
    let if_exists = prop_oneof![Just(IfExists::Replace), Just(IfExists::Fail)];
    prop_oneof![
        (any::<u32>(), any::<Option<u32>>()).prop_map(|(index, mtu)| Request::LinkUp { index, mtu }),
        (any::<u32>(), ip.clone(), any::<u8>(), if_exists).prop_map(|(index, address, prefix_len, if_exists)| {
            Request::AddAddress { index, address, prefix_len, if_exists }
        }),
        (any::<u32>(), ip).prop_map(|(index, gateway)| Request::AddDefaultRoute { index, gateway }),
    ]
}

proptest! {
    #[test]
    fn requests_round_trip(request in any_request(), seq in any::<u32>()) {
        let bytes = request.encode(seq);
        prop_assert_eq!(bytes.len() % 4, 0);
        prop_assert_eq!(u32_at(&bytes, 0) as usize, bytes.len());
        prop_assert_eq!(Request::decode(&bytes), Ok((seq, request)));
    }

    #[test]
    fn built_messages_read_back(
        parts in prop::collection::vec(
            (any::<u16>(), any::<u16>(), any::<u32>(), prop::collection::vec(any::<u8>(), 0..8),
             prop::collection::vec((any::<u16>(), prop::collection::vec(any::<u8>(), 0..12)), 0..4)),
            1..4,
        ),
    ) {
        // Family headers of whole words, as every rtnetlink header is.
        let header_of = |raw: &[u8]| raw[..raw.len() / 4 * 4].to_vec();
        let datagram: Vec<u8> = parts.iter().flat_map(|(kind, flags, seq, header, attributes)| {
            let mut builder = MessageBuilder::new(*kind, *flags, *seq).bytes(&header_of(header));
            for (kind, payload) in attributes {
                builder = builder.attribute(*kind, payload);
            }
            builder.finish()
        }).collect();
        let read: Vec<Message<'_>> = messages(&datagram).collect::<Result<_>>().unwrap();
        prop_assert_eq!(read.len(), parts.len());
        for (message, (kind, flags, seq, header, attributes)) in read.iter().zip(&parts) {
            prop_assert_eq!((message.kind, message.flags, message.seq, message.pid), (*kind, *flags, *seq, 0));
            let header = header_of(header);
            prop_assert_eq!(&message.payload[..header.len()], header.as_slice());
            let read: Vec<(u16, &[u8])> = super::attributes(&message.payload[header.len()..]).collect::<Result<_>>().unwrap();
            let expected: Vec<(u16, &[u8])> = attributes.iter().map(|(kind, payload)| (*kind, payload.as_slice())).collect();
            prop_assert_eq!(read, expected);
        }
    }

    #[test]
    fn acks_round_trip(seq in any::<u32>(), errno in 0..4096i32, other in any::<u32>()) {
        let expected = if errno == 0 { Ack::Accepted } else { Ack::Refused(errno) };
        prop_assert_eq!(find_ack(&ack_message(seq, errno), seq), Ok(Some(expected)));
        prop_assert_eq!(expected.errno(), errno);
        let found = find_ack(&ack_message(other, errno), seq);
        prop_assert_eq!(found, Ok((other == seq).then_some(expected)));
    }

    /// Hostile bytes: every reader answers, never panics, and what decodes
    /// encodes back to the same bytes.
    #[test]
    fn readers_take_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..96), seq in any::<u32>()) {
        let _ = find_ack(&bytes, seq);
        let _ = messages(&bytes).count();
        let _ = attributes(&bytes).count();
        if let Ok((seq, request)) = Request::decode(&bytes) {
            prop_assert_eq!(request.encode(seq), bytes);
        }
    }
}
