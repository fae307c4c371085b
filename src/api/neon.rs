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

/// The most parameters one statement can carry: the Bind message counts
/// them in a 16-bit integer.
pub const MAX_PARAMS: usize = u16::MAX as usize;

/// The allowed values of `Neon-Batch-Isolation-Level`, as the error names them.
const ISOLATION_LEVELS: &str = "ReadUncommitted, ReadCommitted, RepeatableRead or Serializable";

/// Why a request cannot be run; `Display` is the client-facing message.
///
/// Each problem is found here, before anything reaches the database, so a
/// request the protocol cannot carry is a clear 400 rather than a failure
/// deep in the backend connection.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RequestError {
    /// The body is not UTF-8.
    #[error("request body is not valid UTF-8")]
    NotUtf8,
    /// The body is not JSON.
    #[error("request body is not valid JSON: {0}")]
    NotJson(String),
    /// The body is JSON of the wrong shape.
    #[error("{0}")]
    Shape(&'static str),
    /// Query text with a NUL byte: the protocol sends it as a C string.
    #[error(
        "query {query} contains a NUL byte (\\u0000), which PostgreSQL cannot accept in query text"
    )]
    NulInQuery {
        /// 1-based position of the query in the request.
        query: usize,
    },
    /// A text parameter with a NUL byte: PostgreSQL rejects it in any text value.
    #[error(
        "parameter ${param} of query {query} contains a NUL byte (\\u0000), which PostgreSQL cannot accept in a text value"
    )]
    NulInParam {
        /// 1-based position of the query in the request.
        query: usize,
        /// 1-based parameter number (`$n`).
        param: usize,
    },
    /// More parameters than a Bind message can count.
    #[error("query {query} has {count} parameters; PostgreSQL accepts at most {MAX_PARAMS}")]
    TooManyParams {
        /// 1-based position of the query in the request.
        query: usize,
        /// How many were sent.
        count: usize,
    },
    /// An isolation level header that names no level.
    #[error("invalid Neon-Batch-Isolation-Level header {0} (use {ISOLATION_LEVELS})")]
    InvalidIsolation(String),
}

impl RequestError {
    /// The SQLSTATE the error body carries: what PostgreSQL itself reports
    /// for the same problem where it has one, protocol violation otherwise.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Self::NulInQuery { .. } | Self::NulInParam { .. } => "22021",
            Self::TooManyParams { .. } => "54000",
            Self::NotUtf8 | Self::NotJson(_) | Self::Shape(_) | Self::InvalidIsolation(_) => {
                "08P01"
            }
        }
    }
}

/// Parses a request body and checks that the protocol can carry it.
pub fn parse_body(body: &[u8]) -> Result<SqlRequest, RequestError> {
    let text = std::str::from_utf8(body).map_err(|_| RequestError::NotUtf8)?;
    let value: Value =
        serde_json::from_str(text).map_err(|e| RequestError::NotJson(e.to_string()))?;
    let Value::Object(object) = value else {
        return Err(RequestError::Shape(
            "request body must be a JSON object with \"query\" or \"queries\"",
        ));
    };
    match (object.get("query"), object.get("queries")) {
        (Some(_), None) => Ok(SqlRequest::Single(statement(1, &Value::Object(object))?)),
        (None, Some(Value::Array(queries))) => {
            let statements = queries
                .iter()
                .enumerate()
                .map(|(index, query)| statement(index + 1, query))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(SqlRequest::Batch(statements))
        }
        (None, Some(_)) => Err(RequestError::Shape("\"queries\" must be an array")),
        _ => Err(RequestError::Shape(
            "request body must have exactly one of \"query\" and \"queries\"",
        )),
    }
}

/// One statement of a request; `query` is its 1-based position, for messages.
fn statement(query: usize, value: &Value) -> Result<Statement, RequestError> {
    let sql = value
        .get("query")
        .and_then(Value::as_str)
        .ok_or(RequestError::Shape(
            "each query must have a \"query\" string",
        ))?;
    let params = match value.get("params") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(params)) => params.iter().map(param).collect(),
        Some(_) => return Err(RequestError::Shape("\"params\" must be an array")),
    };
    let statement = Statement::with_params(sql, params);
    check_carriable(query, &statement)?;
    Ok(statement)
}

/// Refuses what the extended query protocol cannot carry: a NUL in the
/// query text (sent as a C string) or in a text parameter (refused by every
/// text input function), and more parameters than Bind can count.
fn check_carriable(query: usize, statement: &Statement) -> Result<(), RequestError> {
    if statement.sql.contains('\0') {
        return Err(RequestError::NulInQuery { query });
    }
    if statement.params.len() > MAX_PARAMS {
        return Err(RequestError::TooManyParams {
            query,
            count: statement.params.len(),
        });
    }
    let nul = statement
        .params
        .iter()
        .position(|p| p.as_deref().is_some_and(|text| text.contains('\0')));
    match nul {
        Some(index) => Err(RequestError::NulInParam {
            query,
            param: index + 1,
        }),
        None => Ok(()),
    }
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

/// Batch options from the raw `Neon-Batch-*` header values.
///
/// The isolation level must name a level exactly (bytes that are not even
/// UTF-8 included): running a batch at another level than the client asked
/// for would be a silent change of its semantics. The two flags are true
/// only for the exact value `true`, as in Neon.
pub fn batch_options(
    isolation: Option<&[u8]>,
    read_only: Option<&[u8]>,
    deferrable: Option<&[u8]>,
) -> Result<TransactionOptions, RequestError> {
    let isolation = match isolation {
        None => None,
        Some(b"ReadUncommitted") => Some(IsolationLevel::ReadUncommitted),
        Some(b"ReadCommitted") => Some(IsolationLevel::ReadCommitted),
        Some(b"RepeatableRead") => Some(IsolationLevel::RepeatableRead),
        Some(b"Serializable") => Some(IsolationLevel::Serializable),
        Some(other) => return Err(RequestError::InvalidIsolation(shown(other))),
    };
    Ok(TransactionOptions {
        isolation,
        read_only: read_only == Some(b"true"),
        deferrable: deferrable == Some(b"true"),
        ..TransactionOptions::default()
    })
}

/// A header value as an error message may quote it: escaped, and cut short
/// so that a huge value does not come back whole.
fn shown(value: &[u8]) -> String {
    const SHOWN_BYTES: usize = 64;
    let cut = &value[..value.len().min(SHOWN_BYTES)];
    let text = format!("{:?}", String::from_utf8_lossy(cut));
    if value.len() > SHOWN_BYTES {
        format!("{text}...")
    } else {
        text
    }
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
            let error = parse_body(body).unwrap_err().to_string();
            assert!(error.contains(needle), "{error}");
        }
    }

    #[test]
    fn what_the_protocol_cannot_carry_is_refused_before_it_runs() {
        let nul_query = parse_body(br#"{"query":"SELECT 1\u0000"}"#).unwrap_err();
        assert_eq!(nul_query, RequestError::NulInQuery { query: 1 });
        assert_eq!(nul_query.sqlstate(), "22021");

        let nul_param =
            parse_body(br#"{"queries":[{"query":"SELECT 1"},{"query":"SELECT $1, $2","params":[null,"a\u0000b"]}]}"#)
                .unwrap_err();
        assert_eq!(nul_param, RequestError::NulInParam { query: 2, param: 2 });
        assert!(nul_param.to_string().contains("$2"), "{nul_param}");

        let nul_in_array = parse_body(br#"{"query":"SELECT $1","params":[["\u0000"]]}"#);
        assert!(matches!(nul_in_array, Err(RequestError::NulInParam { .. })));

        let params = vec!["1"; MAX_PARAMS + 1];
        let body = serde_json::json!({"query": "SELECT 1", "params": params}).to_string();
        let too_many = parse_body(body.as_bytes()).unwrap_err();
        assert_eq!(
            too_many,
            RequestError::TooManyParams {
                query: 1,
                count: MAX_PARAMS + 1
            }
        );
        assert!(too_many.to_string().contains("65535"), "{too_many}");

        let params = vec!["1"; MAX_PARAMS];
        let body = serde_json::json!({"query": "SELECT 1", "params": params}).to_string();
        assert!(
            parse_body(body.as_bytes()).is_ok(),
            "exactly the limit is fine"
        );
    }

    #[test]
    fn batch_headers_map_to_transaction_options() {
        let options = batch_options(Some(b"Serializable"), Some(b"true"), Some(b"TRUE")).unwrap();
        assert_eq!(options.isolation, Some(IsolationLevel::Serializable));
        assert!(options.read_only);
        assert!(!options.deferrable, "only the exact value true is true");
        for invalid in [&b"Chaos"[..], b"serializable", b"", b"Serializable\xff"] {
            let error = batch_options(Some(invalid), None, None).unwrap_err();
            let message = error.to_string();
            assert!(message.contains("Neon-Batch-Isolation-Level"), "{message}");
            assert!(message.contains("RepeatableRead"), "{message}");
        }
        let huge = vec![b'x'; 10_000];
        let message = batch_options(Some(&huge), None, None)
            .unwrap_err()
            .to_string();
        assert!(message.len() < 300, "the value is not echoed whole");
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
