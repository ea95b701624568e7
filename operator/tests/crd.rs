//! The generated `LikeTenant` CRD: the committed files match `crdgen`, the
//! schema is structural and described, and the API server's validation would
//! reject bad specs (checked with `common`, the validation half of an API
//! server).

use std::collections::BTreeSet;
use std::path::Path;

use common::{Apiserver, Layer, Rejection, open_api_schema};
use serde_json::{Value, json};
use thumbup_operator::crdgen;

mod common;

const CRDGEN: &str = "cargo run -p thumbup-operator --bin crdgen -- --write .";

// ---------------------------------------------------------------------------
// crdgen output

#[test]
fn committed_crd_files_equal_crdgen_output() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut stale = Vec::new();
    for (path, generated) in crdgen::files() {
        match std::fs::read_to_string(root.join(path)) {
            Ok(committed) if committed == generated => {}
            Ok(_) => stale.push(format!("{path} differs from the crdgen output")),
            Err(e) => stale.push(format!("{path} cannot be read: {e}")),
        }
    }
    assert!(stale.is_empty(), "{}; regenerate with `{CRDGEN}` and commit the result", stale.join("; "));
}

// ---------------------------------------------------------------------------
// Structural schema

/// Formats the API server knows; any other is ignored there, which hides a typo.
const KUBERNETES_FORMATS: &[&str] = &["int32", "int64", "float", "double", "byte", "date", "date-time", "password"];

/// Every node of `schema` with its path, depth first (properties, items,
/// additionalProperties).
fn schema_nodes(path: String, schema: &Value, out: &mut Vec<(String, Value)>) {
    out.push((path.clone(), schema.clone()));
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            schema_nodes(format!("{path}.properties.{name}"), child, out);
        }
    }
    if let Some(items) = schema.get("items") {
        schema_nodes(format!("{path}.items"), items, out);
    }
    if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        schema_nodes(format!("{path}.additionalProperties"), additional, out);
    }
}

/// What makes `node` non-structural (Kubernetes' rules for apiextensions/v1),
/// one line per defect.
fn structural_defects(path: &str, node: &Value) -> Vec<String> {
    let mut defects = Vec::new();
    let flag = |key: &str| node.get(key).and_then(Value::as_bool) == Some(true);
    let untyped_allowed = flag("x-kubernetes-int-or-string") || flag("x-kubernetes-preserve-unknown-fields");
    let ty = node.get("type").and_then(Value::as_str);
    if ty.is_none() && !untyped_allowed {
        defects.push(format!("{path}: no type"));
    }
    for key in ["anyOf", "oneOf", "allOf", "not", "$ref"] {
        if node.get(key).is_some() {
            defects.push(format!("{path}: has {key}"));
        }
    }
    if node.get("properties").is_some() && node.get("additionalProperties").is_some() {
        defects.push(format!("{path}: both properties and additionalProperties"));
    }
    if ty == Some("array") && node.get("items").is_none() {
        defects.push(format!("{path}: array without items"));
    }
    if let Some(format) = node.get("format")
        && !format.as_str().is_some_and(|f| KUBERNETES_FORMATS.contains(&f))
    {
        defects.push(format!("{path}: format {format} unknown to Kubernetes"));
    }
    if node.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
        let keys = node.get("x-kubernetes-list-map-keys").and_then(Value::as_array);
        let item = node.get("items");
        match keys {
            None => defects.push(format!("{path}: list-type map without list-map-keys")),
            Some(keys) => {
                let required: Vec<&Value> = item
                    .and_then(|i| i.get("required"))
                    .and_then(Value::as_array)
                    .map(|r| r.iter().collect())
                    .unwrap_or_default();
                for key in keys {
                    let defaulted =
                        key.as_str().and_then(|k| item?.get("properties")?.get(k)?.get("default")).is_some();
                    if !required.contains(&key) && !defaulted {
                        defects.push(format!("{path}: list-map key {key} neither required nor defaulted"));
                    }
                }
            }
        }
    }
    defects
}

#[test]
fn crd_schema_is_structural() {
    let mut nodes = Vec::new();
    schema_nodes("openAPIV3Schema".into(), &open_api_schema(), &mut nodes);
    // Guards the walk itself: it must reach the business items' fields.
    assert!(
        nodes.iter().any(|(p, _)| p.ends_with("businesses.items.properties.id")),
        "the walk did not reach spec.businesses[].id"
    );
    let defects: Vec<String> = nodes.iter().flat_map(|(p, n)| structural_defects(p, n)).collect();
    assert!(defects.is_empty(), "the CRD schema is not structural:\n{}", defects.join("\n"));
}

#[test]
fn structural_check_flags_untyped_and_any_of_nodes() {
    // The check above would pass vacuously if it found nothing ever.
    let bad = json!({"anyOf": [{"type": "string"}], "format": "uuid"});
    let defects = structural_defects("x", &bad);
    assert_eq!(defects, ["x: no type", "x: has anyOf", "x: format \"uuid\" unknown to Kubernetes"]);
    let int_or_string = json!({"x-kubernetes-int-or-string": true});
    assert!(structural_defects("x", &int_or_string).is_empty());
}

// ---------------------------------------------------------------------------
// Descriptions

#[test]
fn every_spec_and_status_field_has_a_description() {
    let schema = open_api_schema();
    let mut nodes = Vec::new();
    for top in ["spec", "status"] {
        let node = schema.pointer(&format!("/properties/{top}")).unwrap_or_else(|| panic!("no {top} in the schema"));
        schema_nodes(top.into(), node, &mut nodes);
    }
    nodes.push(("openAPIV3Schema".into(), schema));
    let undescribed: Vec<&str> = nodes
        .iter()
        .filter(|(_, n)| n.get("description").and_then(Value::as_str).is_none_or(|d| d.trim().is_empty()))
        .map(|(p, _)| p.as_str())
        .collect();
    assert!(nodes.len() > 30, "only {} nodes walked", nodes.len());
    assert!(undescribed.is_empty(), "fields without a description (add a doc comment): {undescribed:?}");
}

// ---------------------------------------------------------------------------
// Validation

/// A valid LikeTenant with two businesses and no schemaName.
fn good() -> Value {
    json!({
        "apiVersion": "thumbup.io/v1alpha1",
        "kind": "LikeTenant",
        "metadata": {"name": "demo", "namespace": "thumbup"},
        "spec": {
            "businesses": [{"id": 1, "name": "video"}, {"id": 2, "name": "comment"}],
            "job": {"replicas": 2},
            "deletionPolicy": "Retain",
        },
    })
}

/// `object` with the value at JSON pointer `at` set to `value`.
fn with(mut object: Value, at: &str, value: Value) -> Value {
    let (parent, key) = at.rsplit_once('/').expect("a pointer");
    let parent =
        object.pointer_mut(parent).and_then(Value::as_object_mut).unwrap_or_else(|| panic!("no object at {parent}"));
    parent.insert(key.to_string(), value);
    object
}

/// `object` without the field at JSON pointer `at`.
fn without(mut object: Value, at: &str) -> Value {
    let (parent, key) = at.rsplit_once('/').expect("a pointer");
    let parent =
        object.pointer_mut(parent).and_then(Value::as_object_mut).unwrap_or_else(|| panic!("no object at {parent}"));
    assert!(parent.remove(key).is_some(), "nothing at {at}");
    object
}

fn rejection(layer: Layer, path: &str, what: &str) -> Rejection {
    (layer, path.to_string(), what.to_string())
}

const NAME_RULE: &str = "the tenant name must match [a-z][a-z0-9-]{0,30}";
const UNIQUE_IDS_RULE: &str = "business ids must be unique";
const SCHEMA_NAME_RULE: &str = "schemaName is fixed at creation and cannot change";

/// Asserts that exactly `expected` rejected `object` (created, or updated
/// from `old`): no other layer or rule, so a validator that rejects
/// everything, or the right object for the wrong reason, fails.
#[track_caller]
fn assert_rejections(object: &Value, old: Option<&Value>, expected: &[Rejection]) {
    let got = Apiserver::new().validate(object, old);
    let expected: BTreeSet<Rejection> = expected.iter().cloned().collect();
    assert_eq!(got, expected, "object: {object:#}");
}

#[test]
fn good_tenant_passes_every_layer() {
    assert_rejections(&good(), None, &[]);
    assert_rejections(&with(good(), "/spec/schemaName", json!("thumbup_demo")), None, &[]);
    // A status as the operator writes it, with a nullable field set to null.
    let condition =
        json!({"type": "Ready", "status": "True", "reason": "Ready", "lastTransitionTime": "2025-01-01T00:00:00Z"});
    let status =
        json!({"conditions": [condition], "schema": "thumbup_demo", "businesses": 2, "activeDatacenter": null});
    assert_rejections(&with(good(), "/status", status), None, &[]);
}

/// A status as the failover controller writes it after a flip that left a
/// failover blocked.
fn failover_status() -> Value {
    json!({
        "activeDatacenter": "dc-b", "failoverEpoch": 4, "failingSince": "2026-11-23T08:00:00Z",
        "lastTransition": {"time": "2026-11-22T20:00:00Z", "kind": "Failover", "from": "dc-a", "to": "dc-b",
            "epoch": 4, "reason": "3 probes failed"},
        "failoverBlocked": {"reason": "StandbyUnhealthy", "message": "replication stopped",
            "since": "2026-11-23T08:00:06Z"},
    })
}

#[test]
fn failover_status_as_written_passes_and_null_clears_each_field() {
    assert_rejections(&with(good(), "/status", failover_status()), None, &[]);
    let cleared = json!({"activeDatacenter": "dc-b", "failoverEpoch": 4, "failingSince": null,
        "lastTransition": null, "failoverBlocked": null});
    assert_rejections(&with(good(), "/status", cleared), None, &[]);
}

#[test]
fn unknown_transition_kind_and_incomplete_blocked_record_are_rejected_by_openapi() {
    let status = with(failover_status(), "/lastTransition/kind", json!("Failback"));
    let status = without(status, "/failoverBlocked/reason");
    assert_rejections(
        &with(good(), "/status", status),
        None,
        &[
            rejection(Layer::OpenApi, "status.lastTransition.kind", "enum"),
            rejection(Layer::OpenApi, "status.failoverBlocked", "required"),
        ],
    );
}

#[test]
fn negative_job_replicas_is_rejected_by_openapi_minimum() {
    let bad = with(good(), "/spec/job/replicas", json!(-1));
    assert_rejections(&bad, None, &[rejection(Layer::OpenApi, "spec.job.replicas", "minimum")]);
}

#[test]
fn empty_businesses_is_rejected_by_openapi_min_items() {
    let bad = with(good(), "/spec/businesses", json!([]));
    assert_rejections(&bad, None, &[rejection(Layer::OpenApi, "spec.businesses", "minItems")]);
}

#[test]
fn missing_businesses_is_rejected_as_required() {
    let bad = without(good(), "/spec/businesses");
    assert_rejections(&bad, None, &[rejection(Layer::OpenApi, "spec", "required")]);
}

#[test]
fn duplicate_business_ids_are_rejected_by_list_map_keys_and_the_unique_ids_rule() {
    let bad = with(good(), "/spec/businesses", json!([{"id": 7, "name": "video"}, {"id": 7, "name": "comment"}]));
    assert_rejections(
        &bad,
        None,
        &[
            rejection(Layer::ListType, "spec.businesses[1]", "duplicate"),
            rejection(Layer::Cel, "spec.businesses", UNIQUE_IDS_RULE),
        ],
    );
}

#[test]
fn duplicate_condition_types_in_status_are_rejected_by_list_map_keys() {
    let condition =
        json!({"type": "Ready", "status": "True", "reason": "Ready", "lastTransitionTime": "2025-01-01T00:00:00Z"});
    let bad = with(good(), "/status", json!({"conditions": [condition.clone(), condition]}));
    assert_rejections(&bad, None, &[rejection(Layer::ListType, "status.conditions[1]", "duplicate")]);
}

#[test]
fn business_id_zero_is_rejected_by_openapi_minimum() {
    let bad = with(good(), "/spec/businesses/1/id", json!(0));
    assert_rejections(&bad, None, &[rejection(Layer::OpenApi, "spec.businesses[1].id", "minimum")]);
}

#[test]
fn tenant_name_outside_the_name_pattern_is_rejected_by_the_root_cel_rule() {
    let bad = with(good(), "/metadata/name", json!("Bad_Name"));
    assert_rejections(&bad, None, &[rejection(Layer::Cel, "", NAME_RULE)]);
}

#[test]
fn unknown_deletion_policy_is_rejected_by_openapi_enum() {
    let bad = with(good(), "/spec/deletionPolicy", json!("Sometimes"));
    assert_rejections(&bad, None, &[rejection(Layer::OpenApi, "spec.deletionPolicy", "enum")]);
}

#[test]
fn changing_schema_name_on_update_is_rejected_by_the_transition_rule() {
    let old = with(good(), "/spec/schemaName", json!("a"));
    let new = with(good(), "/spec/schemaName", json!("b"));
    // Either alone is a valid creation: only the transition is wrong.
    assert_rejections(&new, None, &[]);
    assert_rejections(&new, Some(&old), &[rejection(Layer::Cel, "spec", SCHEMA_NAME_RULE)]);
}

#[test]
fn adding_schema_name_after_creation_is_rejected_by_the_transition_rule() {
    let new = with(good(), "/spec/schemaName", json!("thumbup_demo"));
    assert_rejections(&new, Some(&good()), &[rejection(Layer::Cel, "spec", SCHEMA_NAME_RULE)]);
}

#[test]
fn removing_schema_name_on_update_is_rejected_by_the_transition_rule() {
    let old = with(good(), "/spec/schemaName", json!("thumbup_demo"));
    assert_rejections(&good(), Some(&old), &[rejection(Layer::Cel, "spec", SCHEMA_NAME_RULE)]);
}

#[test]
fn explicit_null_schema_name_counts_as_absent_for_the_transition_rule() {
    let new = with(good(), "/spec/schemaName", Value::Null);
    assert_rejections(&new, Some(&good()), &[]);
    let old = with(good(), "/spec/schemaName", json!("thumbup_demo"));
    assert_rejections(&new, Some(&old), &[rejection(Layer::Cel, "spec", SCHEMA_NAME_RULE)]);
}

#[test]
fn update_changing_only_businesses_passes_the_transition_rule() {
    let businesses = json!([{"id": 1, "name": "video"}, {"id": 3, "name": "article"}, {"id": 4, "name": "reply"}]);
    // With a schemaName kept as it was...
    let old = with(good(), "/spec/schemaName", json!("thumbup_demo"));
    let new = with(old.clone(), "/spec/businesses", businesses.clone());
    assert_rejections(&new, Some(&old), &[]);
    // ... and with none on either side.
    let new = with(good(), "/spec/businesses", businesses);
    assert_rejections(&new, Some(&good()), &[]);
}

const RESERVED_SCHEMA_RULE: &str = "schemaName names a system schema or the thumbup control schema";

#[test]
fn system_and_control_schema_names_are_rejected_by_the_cel_rule_in_any_case() {
    for schema in
        ["mysql", "MYSQL", "information_schema", "Performance_Schema", "sys", "metrics_schema", "thumbup__control"]
    {
        let bad = with(good(), "/spec/schemaName", json!(schema));
        assert_rejections(&bad, None, &[rejection(Layer::Cel, "spec.schemaName", RESERVED_SCHEMA_RULE)]);
    }
    for fine in ["mysql_likes", "sys2", "thumbup_control"] {
        assert_rejections(&with(good(), "/spec/schemaName", json!(fine)), None, &[]);
    }
}
