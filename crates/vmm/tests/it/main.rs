//! kiln-vmm's integration tests: real QEMU (TCG) booting the Debian cloud
//! kernel, cloud-hypervisor's API against an in-process fake server
//! (`fake_ch_*`) and, when a binary is on PATH, the real one (`real_ch_*`),
//! and hybrid vsock against a fake peer.

mod fake_ch;
mod props;
mod qemu;
mod real_ch;
mod support;
mod vsock;
