//! Hostile registry answers -> kiln-oci's registry readers
//! (`WWW-Authenticate` challenges, Docker `config.json`, token answers,
//! distribution error bodies, image references) must answer `Ok` or `Err`,
//! never panic.
//!
//! Round trips: a Bearer challenge rendered from arbitrary realm, service
//! and scope (quoted, `"` and `\` escaped) parses back to the same three;
//! a reference that parses displays to text that parses back to it.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use kiln_oci::RegistryReference;
use kiln_oci::fuzzing::{error_detail, parse_challenge, parse_docker_config, parse_token_answer};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Case {
    Challenge(String),
    DockerConfig(Vec<u8>),
    TokenAnswer(Vec<u8>),
    ErrorBody(Vec<u8>),
    Reference(String),
    ChallengeRoundTrip { realm: String, service: Option<String>, scope: Option<String>, spaces: bool },
}

/// `"text"` with `\` before every `"` and `\`.
fn quote(text: &str) -> String {
    let mut quoted = String::from("\"");
    for c in text.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

fuzz_target!(|data: &[u8]| {
    let Ok(case) = Case::arbitrary(&mut Unstructured::new(data)) else { return };
    match case {
        Case::Challenge(header) => {
            let _ = parse_challenge(&header);
        }
        Case::DockerConfig(bytes) => {
            let _ = parse_docker_config(&bytes);
        }
        Case::TokenAnswer(bytes) => {
            let _ = parse_token_answer(&bytes);
        }
        Case::ErrorBody(bytes) => {
            let _ = error_detail(&bytes);
        }
        Case::Reference(text) => {
            if let Ok(reference) = text.parse::<RegistryReference>() {
                let again: RegistryReference = reference.to_string().parse().expect("a displayed reference parses");
                assert_eq!(again, reference);
            }
        }
        Case::ChallengeRoundTrip { realm, service, scope, spaces } => {
            let separator = if spaces { " , " } else { "," };
            let mut header = format!("Bearer realm={}", quote(&realm));
            if let Some(service) = &service {
                header += &format!("{separator}service={}", quote(service));
            }
            if let Some(scope) = &scope {
                header += &format!("{separator}scope={}", quote(scope));
            }
            assert_eq!(parse_challenge(&header), Ok(Some((realm, service, scope))), "{header}");
        }
    }
});
