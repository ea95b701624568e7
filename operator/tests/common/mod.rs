//! The validation half of an API server for the LikeTenant CRD.
//!
//! No API server runs in these tests. [`Apiserver`] stands in for the three
//! checks a real one applies to a custom resource, each reporting as its own
//! layer so that every test can assert which check rejected an object and
//! why: the OpenAPI keywords (the `jsonschema` crate, after translating the
//! Kubernetes-only keys), `x-kubernetes-list-type` uniqueness (our own walk,
//! since JSON Schema has no such keyword) and the CEL rules of
//! `x-kubernetes-validations` (kube's CEL validator, given the old object on
//! updates so that transition rules run). Defaulting and pruning are left out.

use std::collections::BTreeSet;

use kube::CustomResourceExt;
use kube::core::cel::Validator as CelValidator;
use serde_json::{Map, Value, json};
use thumbup_operator::crd::LikeTenant;

/// The `openAPIV3Schema` of the one version of the CRD, as JSON.
pub fn open_api_schema() -> Value {
    let crd = LikeTenant::crd();
    assert_eq!(crd.spec.versions.len(), 1, "one served version");
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the CRD has an openAPIV3Schema");
    serde_json::to_value(schema).expect("the schema serializes")
}

/// Which of the API server's checks rejected an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Layer {
    /// An OpenAPI keyword (type, required, minimum, enum, ...).
    OpenApi,
    /// `x-kubernetes-list-type: map` / `set` uniqueness.
    ListType,
    /// A CEL rule of `x-kubernetes-validations`.
    Cel,
}

/// One rejection: the layer, the field path (`spec.businesses[0].id`) and
/// what failed (the OpenAPI keyword, `duplicate` for list types, the CEL
/// rule's message).
pub type Rejection = (Layer, String, String);

/// The validation half of an API server for the LikeTenant CRD.
pub struct Apiserver {
    schema: Value,
    openapi: jsonschema::Validator,
    cel: CelValidator,
}

impl Apiserver {
    pub fn new() -> Self {
        let schema = open_api_schema();
        let openapi = jsonschema::draft4::options()
            .should_validate_formats(false)
            .build(&to_json_schema(&schema))
            .expect("the translated schema compiles");
        Apiserver { schema, openapi, cel: CelValidator::new() }
    }

    /// Every rejection of `object`, created (`old` None) or updated from `old`.
    pub fn validate(&self, object: &Value, old: Option<&Value>) -> BTreeSet<Rejection> {
        let mut out = BTreeSet::new();
        for e in self.openapi.iter_errors(object) {
            let keyword = e.schema_path().as_str().rsplit('/').next().unwrap_or_default().to_string();
            out.insert((Layer::OpenApi, pointer_to_path(e.instance_path().as_str()), keyword));
        }
        list_type_rejections(&self.schema, object, String::new(), &mut out);
        // The API server hands CEL no null-valued fields ("null valued fields
        // are treated as absent"); kube's validator would see them as set.
        let (object, old) = (without_nulls(object), old.map(without_nulls));
        if let Err(errors) = self.cel.validate(&self.schema, &object, old.as_ref()) {
            for e in errors {
                out.insert((Layer::Cel, e.field_path.clone(), e.message.clone()));
            }
        }
        out
    }
}

/// The CRD schema as plain JSON Schema (draft 4, which OpenAPI v3.0 follows):
/// `nullable: true` admits null, the `x-kubernetes-*` keys go (list types and
/// CEL rules are checked by their own layers), int-or-string becomes a type.
fn to_json_schema(schema: &Value) -> Value {
    let Some(obj) = schema.as_object() else { return schema.clone() };
    let mut out = Map::new();
    for (key, value) in obj {
        let value = match key.as_str() {
            k if k.starts_with("x-kubernetes-") || k == "nullable" => continue,
            "properties" => Value::Object(
                value
                    .as_object()
                    .expect("properties is an object")
                    .iter()
                    .map(|(name, child)| (name.clone(), to_json_schema(child)))
                    .collect(),
            ),
            "items" | "additionalProperties" => to_json_schema(value),
            _ => value.clone(),
        };
        out.insert(key.clone(), value);
    }
    if obj.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
        out.insert("type".into(), json!(["integer", "string"]));
    }
    if obj.get("nullable").and_then(Value::as_bool) == Some(true) {
        if let Some(Value::String(ty)) = out.get("type") {
            let ty = ty.clone();
            out.insert("type".into(), json!([ty, "null"]));
        }
        if let Some(Value::Array(values)) = out.get_mut("enum") {
            values.push(Value::Null);
        }
    }
    Value::Object(out)
}

/// `value` without the object fields whose value is null, at any depth.
fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(obj) => Value::Object(
            obj.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), without_nulls(v))).collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(without_nulls).collect()),
        other => other.clone(),
    }
}

/// `/spec/businesses/0/id` -> `spec.businesses[0].id`, the API server's form.
fn pointer_to_path(pointer: &str) -> String {
    let mut path = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if segment.parse::<usize>().is_ok() {
            path.push_str(&format!("[{segment}]"));
        } else {
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&segment);
        }
    }
    path
}

/// Rejects repeated keys in `x-kubernetes-list-type: map` lists and repeated
/// items in `set` lists, as the API server does: JSON Schema has no such
/// keyword, so the `jsonschema` layer cannot see them.
fn list_type_rejections(schema: &Value, value: &Value, path: String, out: &mut BTreeSet<Rejection>) {
    let join = |name: &str| if path.is_empty() { name.to_string() } else { format!("{path}.{name}") };
    if let (Some(props), Some(obj)) = (schema.get("properties").and_then(Value::as_object), value.as_object()) {
        for (name, child) in obj {
            if let Some(child_schema) = props.get(name) {
                list_type_rejections(child_schema, child, join(name), out);
            }
        }
    } else if let (Some(additional), Some(obj)) = (schema.get("additionalProperties"), value.as_object()) {
        for (name, child) in obj {
            list_type_rejections(additional, child, join(name), out);
        }
    }
    let (Some(items), Some(list)) = (schema.get("items"), value.as_array()) else { return };
    let list_type = schema.get("x-kubernetes-list-type").and_then(Value::as_str);
    let map_keys: Vec<&str> = schema
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|keys| keys.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut seen = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let identity = match list_type {
            Some("map") => {
                Some(Value::Array(map_keys.iter().map(|k| item.get(k).cloned().unwrap_or(Value::Null)).collect()))
            }
            Some("set") => Some(item.clone()),
            _ => None,
        };
        if let Some(identity) = identity {
            if seen.contains(&identity) {
                out.insert((Layer::ListType, format!("{path}[{i}]"), "duplicate".into()));
            }
            seen.push(identity);
        }
        list_type_rejections(items, item, format!("{path}[{i}]"), out);
    }
}
