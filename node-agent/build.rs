//! Builds the eBPF programs (`node-agent-ebpf/`) for `bpfel-unknown-none` with the nightly
//! toolchain and bpf-linker, leaving the object in `OUT_DIR` for `include_bytes_aligned!`.
use std::{env, path::Path};

use anyhow::{Context as _, bail};

fn main() -> anyhow::Result<()> {
    let manifest_dir = env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?;
    let ebpf_dir = Path::new(&manifest_dir).join("../node-agent-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .context("non UTF-8 path to node-agent-ebpf")?;

    let on_path = |program: &str| {
        env::var_os("PATH")
            .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
    };
    if env::var_os("AYA_BUILD_SKIP").is_none() && !on_path("bpf-linker") {
        bail!(
            "bpf-linker is not on PATH, so the eBPF programs cannot be built: \
             run `scripts/setup.sh` once (it builds bpf-linker against nightly's LLVM)"
        );
    }
    let package = aya_build::Package {
        name: "trazor-node-agent-ebpf",
        root_dir: ebpf_dir,
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
        .context("building the eBPF programs failed (see the warnings above); `scripts/setup.sh` installs what they need")
}
