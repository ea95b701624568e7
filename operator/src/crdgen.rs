//! The generated CRD files: `crds/liketenant.yaml` (for `kubectl apply`) and
//! the Helm chart's copy in its `crds/` directory, byte for byte the same.
//! Helm installs a CRD of `crds/` when it is absent, skips it when present
//! (so a CRD applied first is no conflict), and never upgrades or deletes it.

use kube::CustomResourceExt;

use crate::crd::LikeTenant;

/// Path of the plain CRD, from the repository root.
pub const CRD_PATH: &str = "crds/liketenant.yaml";
/// Path of the chart's copy, from the repository root (Helm's `crds/`
/// directory, which is not templated).
pub const CHART_CRD_PATH: &str = "charts/thumbup/crds/liketenant.yaml";

/// The CRD as YAML: what `crdgen` prints and `crds/liketenant.yaml` holds,
/// byte for byte (so `crdgen > crds/liketenant.yaml` works too).
pub fn crd_yaml() -> String {
    serde_yaml::to_string(&LikeTenant::crd()).expect("the CRD serializes")
}

/// Every generated file, as (path from the repo root, content): the same
/// CRD at both paths.
pub fn files() -> [(&'static str, String); 2] {
    [(CRD_PATH, crd_yaml()), (CHART_CRD_PATH, crd_yaml())]
}
