//! The Neon SQL-over-HTTP protocol: what `@neondatabase/serverless` sends in
//! HTTP mode and the JSON it expects back.
//!
//! Requests are `{"query", "params"}` or `{"queries": [...]}` (a transaction
//! batch), described further by `Neon-*` headers. Results carry PostgreSQL's
//! text output unchanged; rows are arrays under `Neon-Array-Mode: true`,
//! objects keyed by field name otherwise. Responses are serialized straight
//! from the backend's rows, without an intermediate JSON tree.

use serde::Serialize;
use serde::ser::{SerializeMap, SerializeSeq};
use serde_json::Value;

use crate::backend::{
    DbError, Field, IsolationLevel, QueryResult, Row, Statement, TransactionOptions,
};

/// A parsed request body.
#[derive(Debug, PartialEq)]
pub enum SqlRequest {
    /// One statement.
    Single(Statement),
    /// Statements run as one transaction.
    Batch(Vec<Statement>),
}

/// Parses a request body; the error is the client-facing message.
pub fn parse_body(body: &[u8]) -> Result<SqlRequest, String> {
    let text =
        std::str::from_utf8(body).map_err(|_| "request body is not valid UTF-8".to_owned())?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("request body is not valid JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err("request body must be a JSON object with \"query\" or \"queries\"".into());
    };
    match (object.get("query"), object.get("queries")) {
        (Some(_), None) => Ok(SqlRequest::Single(statement(&Value::Object(object))?)),
        (None, Some(Value::Array(queries))) => {
            let statements = queries
                .iter()
                .map(statement)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(SqlRequest::Batch(statements))
        }
        (None, Some(_)) => Err("\"queries\" must be an array".into()),
        _ => Err("request body must have exactly one of \"query\" and \"queries\"".into()),
    }
}

fn statement(value: &Value) -> Result<Statement, String> {
    let sql = value
        .get("query")
        .and_then(Value::as_str)
        .ok_or_else(|| "each query must have a \"query\" string".to_owned())?;
    let params = match value.get("params") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(params)) => params.iter().map(param).collect(),
        Some(_) => return Err("\"params\" must be an array".into()),
    };
    Ok(Statement::with_params(sql, params))
}

/// A parameter in PostgreSQL text format: strings as they are (the Neon
/// driver has already serialized Dates, Buffers and arrays), other JSON
/// values as their natural text, arrays as array literals.
fn param(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        Value::Array(items) => Some(array_literal(items)),
        Value::Object(_) => Some(value.to_string()),
    }
}

fn array_literal(items: &[Value]) -> String {
    let elements: Vec<String> = items
        .iter()
        .map(|item| match item {
            Value::Null => "NULL".to_owned(),
            Value::Array(inner) => array_literal(inner),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::String(s) => quote_element(s),
            Value::Object(_) => quote_element(&item.to_string()),
        })
        .collect();
    format!("{{{}}}", elements.join(","))
}

fn quote_element(text: &str) -> String {
    let escaped = text.replace('\\', "\\\\").replace('"', "\\\"");
    format!("\"{escaped}\"")
}

/// Batch options from the `Neon-Batch-*` headers.
pub fn batch_options(
    isolation: Option<&str>,
    read_only: Option<&str>,
    deferrable: Option<&str>,
) -> Result<TransactionOptions, String> {
    let isolation = match isolation {
        None => None,
        Some("ReadUncommitted") => Some(IsolationLevel::ReadUncommitted),
        Some("ReadCommitted") => Some(IsolationLevel::ReadCommitted),
        Some("RepeatableRead") => Some(IsolationLevel::RepeatableRead),
        Some("Serializable") => Some(IsolationLevel::Serializable),
        Some(other) => {
            return Err(format!(
                "invalid Neon-Batch-Isolation-Level {other:?} (use ReadUncommitted, ReadCommitted, RepeatableRead or Serializable)"
            ));
        }
    };
    Ok(TransactionOptions {
        isolation,
        read_only: read_only == Some("true"),
        deferrable: deferrable == Some("true"),
        ..TransactionOptions::default()
    })
}

/// One statement's result in Neon's shape.
pub struct ResultBody<'a> {
    /// The result.
    pub result: &'a QueryResult,
    /// Rows as arrays (true) or objects keyed by field name.
    pub array_mode: bool,
}

impl Serialize for ResultBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(5))?;
        map.serialize_entry("command", self.result.command())?;
        map.serialize_entry("rowCount", &self.result.row_count())?;
        let rows = Rows {
            rows: &self.result.rows,
            fields: &self.result.fields,
            array_mode: self.array_mode,
        };
        map.serialize_entry("rows", &rows)?;
        let fields: Vec<FieldBody<'_>> = self.result.fields.iter().map(FieldBody).collect();
        map.serialize_entry("fields", &fields)?;
        map.serialize_entry("rowAsArray", &self.array_mode)?;
        map.end()
    }
}

/// A batch's results in Neon's shape.
pub struct BatchBody<'a> {
    /// One result per statement.
    pub results: &'a [QueryResult],
    /// Rows as arrays or objects.
    pub array_mode: bool,
}

impl Serialize for BatchBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(1))?;
        let results: Vec<ResultBody<'_>> = self
            .results
            .iter()
            .map(|result| ResultBody {
                result,
                array_mode: self.array_mode,
            })
            .collect();
        map.serialize_entry("results", &results)?;
        map.end()
    }
}

struct FieldBody<'a>(&'a Field);

impl Serialize for FieldBody<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let f = self.0;
        let mut map = serializer.serialize_map(Some(7))?;
        map.serialize_entry("name", &f.name)?;
        map.serialize_entry("dataTypeID", &f.type_oid)?;
        map.serialize_entry("tableID", &f.table_oid)?;
        map.serialize_entry("columnID", &f.column_id)?;
        map.serialize_entry("dataTypeSize", &f.type_size)?;
        map.serialize_entry("dataTypeModifier", &f.type_modifier)?;
        map.serialize_entry("format", "text")?;
        map.end()
    }
}

struct Rows<'a> {
    rows: &'a [Row],
    fields: &'a [Field],
    array_mode: bool,
}

impl Serialize for Rows<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.rows.len()))?;
        for row in self.rows {
            if self.array_mode {
                seq.serialize_element(&RowArray(row))?;
            } else {
                seq.serialize_element(&RowObject {
                    row,
                    fields: self.fields,
                })?;
            }
        }
        seq.end()
    }
}

struct RowArray<'a>(&'a Row);

impl Serialize for RowArray<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for value in self.0.values() {
            seq.serialize_element(&value)?;
        }
        seq.end()
    }
}

struct RowObject<'a> {
    row: &'a Row,
    fields: &'a [Field],
}

impl Serialize for RowObject<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.fields.len()))?;
        for (field, value) in self.fields.iter().zip(self.row.values()) {
            map.serialize_entry(&field.name, &value)?;
        }
        map.end()
    }
}

/// The error body: all seventeen keys, null when unknown.
pub fn error_body(message: &str, code: Option<&str>, db: Option<&DbError>) -> Value {
    let text = |value: Option<&String>| value.map_or(Value::Null, |v| Value::String(v.clone()));
    let code = db.map(|e| e.code.as_str()).or(code);
    serde_json::json!({
        "message": db.map_or(message, |e| e.message.as_str()),
        "code": code,
        "detail": text(db.and_then(|e| e.detail.as_ref())),
        "hint": text(db.and_then(|e| e.hint.as_ref())),
        "position": text(db.and_then(|e| e.position.as_ref())),
        "internalPosition": text(db.and_then(|e| e.internal_position.as_ref())),
        "internalQuery": text(db.and_then(|e| e.internal_query.as_ref())),
        "where": text(db.and_then(|e| e.where_.as_ref())),
        "schema": text(db.and_then(|e| e.schema.as_ref())),
        "table": text(db.and_then(|e| e.table.as_ref())),
        "column": text(db.and_then(|e| e.column.as_ref())),
        "dataType": text(db.and_then(|e| e.data_type.as_ref())),
        "constraint": text(db.and_then(|e| e.constraint.as_ref())),
        "file": text(db.and_then(|e| e.file.as_ref())),
        "line": text(db.and_then(|e| e.line.as_ref())),
        "routine": text(db.and_then(|e| e.routine.as_ref())),
        "severity": db.map_or(Value::String("ERROR".into()), |e| Value::String(e.severity.clone())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_parse_into_statements_with_text_parameters() {
        let single = parse_body(br#"{"query":"SELECT $1, $2, $3, $4, $5, $6","params":["x",null,42,true,[1,"a\"b",null,[2]],{"k":1}]}"#).unwrap();
        let SqlRequest::Single(statement) = single else {
            panic!("single")
        };
        let expected = [
            Some("x"),
            None,
            Some("42"),
            Some("true"),
            Some(r#"{1,"a\"b",NULL,{2}}"#),
            Some(r#"{"k":1}"#),
        ];
        assert_eq!(statement.params, expected.map(|p| p.map(String::from)));

        let batch = parse_body(
            br#"{"queries":[{"query":"SELECT 1"},{"query":"SELECT $1","params":["2"]}]}"#,
        )
        .unwrap();
        assert!(matches!(batch, SqlRequest::Batch(ref s) if s.len() == 2));
    }

    #[test]
    fn malformed_bodies_say_what_is_wrong() {
        let cases: [(&[u8], &str); 6] = [
            (b"\xff\xfe", "UTF-8"),
            (b"{not json", "not valid JSON"),
            (b"[1]", "JSON object"),
            (br#"{"query":1}"#, "\"query\" string"),
            (
                br#"{"query":"x","params":"y"}"#,
                "\"params\" must be an array",
            ),
            (br#"{"query":"x","queries":[]}"#, "exactly one"),
        ];
        for (body, needle) in cases {
            let error = parse_body(body).unwrap_err();
            assert!(error.contains(needle), "{error}");
        }
    }

    #[test]
    fn batch_headers_map_to_transaction_options() {
        let options = batch_options(Some("Serializable"), Some("true"), Some("TRUE")).unwrap();
        assert_eq!(options.isolation, Some(IsolationLevel::Serializable));
        assert!(options.read_only);
        assert!(!options.deferrable, "only the exact value true is true");
        assert!(batch_options(Some("Chaos"), None, None).is_err());
    }

    #[test]
    fn the_error_body_has_all_seventeen_keys() {
        let body = error_body("bad", Some("08P01"), None);
        assert_eq!(body.as_object().unwrap().len(), 17);
        assert_eq!(body["message"], "bad");
        assert_eq!(body["code"], "08P01");
        assert!(body["position"].is_null());
    }
}
