//! Prints the `TraceProfile` CRD as YAML:
//! `cargo run -p trazor-operator --bin crdgen > crds/traceprofile.yaml`.

fn main() -> anyhow::Result<()> {
    print!("{}", trazor_operator::crd_yaml()?);
    Ok(())
}
