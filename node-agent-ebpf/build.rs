//! Declares `bpf_target_arch` (the architecture whose syscall numbers and `struct pt_regs`
//! the programs are built for) and sets it from the host when aya-build did not pass it.
fn main() -> anyhow::Result<()> {
    aya_build::emit_bpf_target_arch_cfg()
}
