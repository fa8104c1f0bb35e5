//! /openapi/v2: one Swagger 2.0 document built from the registered kinds, as JSON or, when
//! asked for, as the protobuf (gnostic `openapi.v2.Document`) that kubectl up to 1.27 wants
//! for `apply` (does the server take `fieldValidation`?) and `explain`.
//!
//! Like the /openapi/v3 documents (`openapi.rs`), every kind has a get and a patch
//! operation carrying `x-kubernetes-group-version-kind`, and the patch lists the
//! `fieldValidation` query parameter, so kubectl leaves validation to the server. Only CRD
//! kinds have definitions (their openAPIV3Schema, for `explain`): a built-in kind without
//! one makes kubectl compute strategic merge patches from its compiled-in types, as it
//! does against any server.
//!
//! The gnostic messages are declared here with `prost` derives: no published crate carries
//! them (k8s-pb has Kubernetes' own types only). Only the fields this document uses are
//! declared; their tags are those of gnostic's `openapiv2/OpenAPIv2.proto`, and a decoder
//! skips the fields it does not know.

use prost::Message;
use serde_json::{Map, Value, json};

use super::GIT_VERSION;
use super::openapi::schema_for_v2;
use super::resources::{ResourceType, strings_at};
use super::store::Inner;

/// What kubectl asks for (Accept) and what the real server answers with.
pub(crate) const PROTOBUF_ACCEPT: &str =
    "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
pub(crate) const PROTOBUF_CONTENT_TYPE: &str =
    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

fn definition_id(rt: &ResourceType, version: &str) -> String {
    let reversed: Vec<&str> = rt.group.split('.').rev().collect();
    format!("{}.{version}.{}", reversed.join("."), rt.kind)
}

/// The Swagger 2.0 document as JSON.
pub(crate) fn document(inner: &Inner) -> Value {
    let mut types: Vec<(&ResourceType, &str)> = inner
        .types()
        .flat_map(|rt| {
            rt.versions
                .iter()
                .map(move |v| (rt.as_ref(), v.name.as_str()))
        })
        .collect();
    types.sort_by(|a, b| (&a.0.group, a.1, &a.0.plural).cmp(&(&b.0.group, b.1, &b.0.plural)));
    let mut paths = Map::new();
    let mut definitions = Map::new();
    for (rt, version) in types {
        let gv = if rt.group.is_empty() {
            format!("api/{version}")
        } else {
            format!("apis/{}/{version}", rt.group)
        };
        let item = if rt.namespaced {
            format!("/{gv}/namespaces/{{namespace}}/{}/{{name}}", rt.plural)
        } else {
            format!("/{gv}/{}/{{name}}", rt.plural)
        };
        let gvk = json!({"group": rt.group, "version": version, "kind": rt.kind});
        let op_id = |verb: &str| format!("{verb}{}{}", rt.kind, version);
        let response = match rt.from_crd {
            true => json!({"$ref": format!("#/definitions/{}", definition_id(rt, version))}),
            false => json!({"type": "object"}),
        };
        let responses = json!({"200": {"description": "OK", "schema": response}});
        let query = |name: &str| json!({"name": name, "in": "query", "type": "string", "uniqueItems": true});
        paths.insert(
            item,
            json!({
                "get": {"operationId": op_id("read"), "responses": responses,
                        "x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk},
                "patch": {"operationId": op_id("patch"), "responses": responses,
                          "parameters": [query("dryRun"), query("fieldManager"),
                                         query("fieldValidation"), query("force")],
                          "x-kubernetes-action": "patch", "x-kubernetes-group-version-kind": gvk},
            }),
        );
        if rt.from_crd {
            definitions.insert(definition_id(rt, version), schema_for_v2(rt, version));
        }
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": GIT_VERSION},
        "paths": paths,
        "definitions": definitions,
    })
}

/// The same document as gnostic protobuf.
pub(crate) fn protobuf(doc: &Value) -> Vec<u8> {
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let paths = doc
        .get("paths")
        .and_then(Value::as_object)
        .map(|p| {
            p.iter()
                .map(|(name, item)| pb::NamedPathItem {
                    name: name.clone(),
                    value: Some(pb::PathItem {
                        get: item.get("get").map(operation),
                        patch: item.get("patch").map(operation),
                    }),
                })
                .collect()
        })
        .unwrap_or_default();
    let definitions = doc
        .get("definitions")
        .and_then(Value::as_object)
        .map(|d| {
            d.iter()
                .map(|(name, s)| pb::NamedSchema {
                    name: name.clone(),
                    value: Some(schema(s)),
                })
                .collect()
        })
        .unwrap_or_default();
    let info = doc.get("info").cloned().unwrap_or_default();
    pb::Document {
        swagger: text(doc, "swagger"),
        info: Some(pb::Info {
            title: text(&info, "title"),
            version: text(&info, "version"),
        }),
        paths: Some(pb::Paths { path: paths }),
        definitions: Some(pb::Definitions {
            additional_properties: definitions,
        }),
    }
    .encode_to_vec()
}

/// `x-…` keys as gnostic vendor extensions: the value as YAML, as kube-openapi writes it.
fn vendor_extensions(v: &Value) -> Vec<pb::NamedAny> {
    let Some(m) = v.as_object() else {
        return Vec::new();
    };
    m.iter()
        .filter(|(k, _)| k.starts_with("x-"))
        .map(|(k, v)| pb::NamedAny {
            name: k.clone(),
            value: Some(any(v)),
        })
        .collect()
}

fn any(v: &Value) -> pb::Any {
    pb::Any {
        yaml: serde_yaml::to_string(v).unwrap_or_default(),
    }
}

fn operation(op: &Value) -> pb::Operation {
    let parameters = op
        .get("parameters")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| pb::ParametersItem {
                    oneof: Some(pb::parameters_item::Oneof::Parameter(pb::Parameter {
                        oneof: Some(pb::parameter::Oneof::NonBodyParameter(
                            pb::NonBodyParameter {
                                oneof: Some(pb::non_body_parameter::Oneof::Query(
                                    pb::QueryParameterSubSchema {
                                        r#in: "query".into(),
                                        name: p["name"].as_str().unwrap_or("").into(),
                                        r#type: "string".into(),
                                        unique_items: true,
                                    },
                                )),
                            },
                        )),
                    })),
                })
                .collect()
        })
        .unwrap_or_default();
    pb::Operation {
        operation_id: op["operationId"].as_str().unwrap_or("").into(),
        parameters,
        vendor_extension: vendor_extensions(op),
    }
}

fn schema(s: &Value) -> pb::Schema {
    let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let properties = s
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| pb::Properties {
            additional_properties: p
                .iter()
                .map(|(name, v)| pb::NamedSchema {
                    name: name.clone(),
                    value: Some(schema(v)),
                })
                .collect(),
        });
    let additional_properties = match s.get("additionalProperties") {
        Some(Value::Bool(b)) => Some(pb::AdditionalPropertiesItem {
            oneof: Some(pb::additional_properties_item::Oneof::Boolean(*b)),
        }),
        Some(v @ Value::Object(_)) => Some(pb::AdditionalPropertiesItem {
            oneof: Some(pb::additional_properties_item::Oneof::Schema(Box::new(
                schema(v),
            ))),
        }),
        _ => None,
    };
    let items = s
        .get("items")
        .filter(|i| i.is_object())
        .map(|i| pb::ItemsItem {
            schema: vec![schema(i)],
        });
    pb::Schema {
        r#ref: text("$ref"),
        format: text("format"),
        title: text("title"),
        description: text("description"),
        required: strings_at(s, &["required"]),
        r#enum: s
            .get("enum")
            .and_then(Value::as_array)
            .map(|a| a.iter().map(any).collect())
            .unwrap_or_default(),
        additional_properties,
        r#type: s.get("type").and_then(Value::as_str).map(|t| pb::TypeItem {
            value: vec![t.to_string()],
        }),
        items,
        properties,
        vendor_extension: vendor_extensions(s),
    }
}

/// The subset of gnostic's `openapi.v2` messages this document uses (same names and tags).
mod pb {
    /// gnostic's `Named*` messages: a name (tag 1) and a value (tag 2).
    macro_rules! named {
        ($name:ident, $value:ty) => {
            #[derive(Clone, PartialEq, prost::Message)]
            pub struct $name {
                #[prost(string, tag = "1")]
                pub name: String,
                #[prost(message, optional, tag = "2")]
                pub value: Option<$value>,
            }
        };
    }

    /// A gnostic message that is a oneof of which this document uses one variant:
    /// `$name { oneof: $module::Oneof::$variant($inner) }`, tag `$tag` (`$path` is
    /// `"$module::Oneof"`, spelled out for prost).
    macro_rules! one_of {
        ($name:ident, $module:ident, $path:tt, $tag:tt, $variant:ident($inner:ident)) => {
            #[derive(Clone, PartialEq, prost::Message)]
            pub struct $name {
                #[prost(oneof = $path, tags = $tag)]
                pub oneof: Option<$module::Oneof>,
            }

            pub mod $module {
                #[derive(Clone, PartialEq, prost::Oneof)]
                pub enum Oneof {
                    #[prost(message, tag = $tag)]
                    $variant(super::$inner),
                }
            }
        };
    }

    named!(NamedPathItem, PathItem);
    named!(NamedSchema, Schema);
    named!(NamedAny, Any);
    one_of!(
        ParametersItem,
        parameters_item,
        "parameters_item::Oneof",
        "1",
        Parameter(Parameter)
    );
    one_of!(
        Parameter,
        parameter,
        "parameter::Oneof",
        "2",
        NonBodyParameter(NonBodyParameter)
    );
    one_of!(
        NonBodyParameter,
        non_body_parameter,
        "non_body_parameter::Oneof",
        "3",
        Query(QueryParameterSubSchema)
    );

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Document {
        #[prost(string, tag = "1")]
        pub swagger: String,
        #[prost(message, optional, tag = "2")]
        pub info: Option<Info>,
        #[prost(message, optional, tag = "8")]
        pub paths: Option<Paths>,
        #[prost(message, optional, tag = "9")]
        pub definitions: Option<Definitions>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Info {
        #[prost(string, tag = "1")]
        pub title: String,
        #[prost(string, tag = "2")]
        pub version: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Paths {
        #[prost(message, repeated, tag = "2")]
        pub path: Vec<NamedPathItem>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct PathItem {
        #[prost(message, optional, tag = "2")]
        pub get: Option<Operation>,
        #[prost(message, optional, tag = "8")]
        pub patch: Option<Operation>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Operation {
        #[prost(string, tag = "5")]
        pub operation_id: String,
        #[prost(message, repeated, tag = "8")]
        pub parameters: Vec<ParametersItem>,
        #[prost(message, repeated, tag = "13")]
        pub vendor_extension: Vec<NamedAny>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct QueryParameterSubSchema {
        #[prost(string, tag = "2")]
        pub r#in: String,
        #[prost(string, tag = "4")]
        pub name: String,
        #[prost(string, tag = "6")]
        pub r#type: String,
        #[prost(bool, tag = "20")]
        pub unique_items: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Definitions {
        #[prost(message, repeated, tag = "1")]
        pub additional_properties: Vec<NamedSchema>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Any {
        #[prost(string, tag = "2")]
        pub yaml: String,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Schema {
        #[prost(string, tag = "1")]
        pub r#ref: String,
        #[prost(string, tag = "2")]
        pub format: String,
        #[prost(string, tag = "3")]
        pub title: String,
        #[prost(string, tag = "4")]
        pub description: String,
        #[prost(string, repeated, tag = "19")]
        pub required: Vec<String>,
        #[prost(message, repeated, tag = "20")]
        pub r#enum: Vec<Any>,
        #[prost(message, optional, tag = "21")]
        pub additional_properties: Option<AdditionalPropertiesItem>,
        #[prost(message, optional, tag = "22")]
        pub r#type: Option<TypeItem>,
        #[prost(message, optional, tag = "23")]
        pub items: Option<ItemsItem>,
        #[prost(message, optional, tag = "25")]
        pub properties: Option<Properties>,
        #[prost(message, repeated, tag = "31")]
        pub vendor_extension: Vec<NamedAny>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct AdditionalPropertiesItem {
        #[prost(oneof = "additional_properties_item::Oneof", tags = "1, 2")]
        pub oneof: Option<additional_properties_item::Oneof>,
    }

    pub mod additional_properties_item {
        #[derive(Clone, PartialEq, prost::Oneof)]
        pub enum Oneof {
            #[prost(message, tag = "1")]
            Schema(Box<super::Schema>),
            #[prost(bool, tag = "2")]
            Boolean(bool),
        }
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TypeItem {
        #[prost(string, repeated, tag = "1")]
        pub value: Vec<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ItemsItem {
        #[prost(message, repeated, tag = "1")]
        pub schema: Vec<Schema>,
    }

    /// gnostic's `Properties`: the same field and tag as [`Definitions`].
    pub type Properties = Definitions;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protobuf_round_trips_paths_and_schemas() {
        let doc = json!({
            "swagger": "2.0", "info": {"title": "Kubernetes", "version": "v1"},
            "paths": {"/apis/g/v1/xs/{name}": {"patch": {
                "operationId": "patchXv1",
                "parameters": [{"name": "fieldValidation", "in": "query", "type": "string"}],
                "x-kubernetes-group-version-kind": {"group": "g", "version": "v1", "kind": "X"}}}},
            "definitions": {"g.v1.X": {"type": "object", "description": "an X",
                "properties": {"spec": {"type": "object", "required": ["a"],
                    "properties": {"a": {"type": "array", "items": {"type": "string"}}},
                    "additionalProperties": false}}}},
        });
        let decoded = pb::Document::decode(protobuf(&doc).as_slice()).unwrap();
        let path = &decoded.paths.unwrap().path[0];
        let patch = path.value.as_ref().unwrap().patch.as_ref().unwrap();
        let ext = &patch.vendor_extension[0];
        assert_eq!(ext.name, "x-kubernetes-group-version-kind");
        let gvk: Value = serde_yaml::from_str(&ext.value.as_ref().unwrap().yaml).unwrap();
        assert_eq!(gvk["kind"], "X");
        let def = &decoded.definitions.unwrap().additional_properties[0];
        let spec = &def
            .value
            .as_ref()
            .unwrap()
            .properties
            .as_ref()
            .unwrap()
            .additional_properties[0];
        let spec = spec.value.as_ref().unwrap();
        assert_eq!(spec.required, ["a"]);
        assert_eq!(spec.r#type.as_ref().unwrap().value, ["object"]);
    }
}
