//! `crdgen`: prints the LikeTenant CRD, or writes it to `crds/liketenant.yaml`
//! and the Helm chart's `crds/liketenant.yaml` with `--write <repo root>`.

use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => print!("{}", thumbup_operator::crdgen::crd_yaml()),
        (Some("--write"), root) => {
            let root = PathBuf::from(root.unwrap_or_else(|| ".".into()));
            for (path, text) in thumbup_operator::crdgen::files() {
                std::fs::write(root.join(path), text)?;
                println!("wrote {path}");
            }
        }
        (Some(other), _) => anyhow::bail!("unknown argument {other:?}; usage: crdgen [--write <repo root>]"),
    }
    Ok(())
}
