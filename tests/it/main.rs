//! The `kiln` package's integration tests: one binary, one module per area.
//! CLI tests run the real `kiln` binary; interop checks read every image
//! back with tools that share no code with kiln's writer.

#![allow(clippy::unwrap_used)]

mod cli_errors;
mod cli_ext4;
mod cli_images;
mod cli_info;
mod cli_initramfs;
#[cfg(feature = "k8s")]
mod cli_k8s;
mod cli_oci;
mod cli_pod;
mod cli_qcow2;
mod cli_render;
mod cli_writers;
mod ext4_guest;
#[cfg(feature = "k8s")]
mod fake_k8s;
mod guest_boot;
mod launch_sh;
mod oci_debian_guest;
mod oci_guest;
mod run_ch;
mod run_e2e;
mod run_egress;
mod run_exit;
mod run_gc;
mod support;
mod tools;
