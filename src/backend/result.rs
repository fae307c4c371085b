//! What a statement returns: field descriptions, rows in text format, and the command tag.
//!
//! Rows keep the server's `DataRow` bytes and only the offsets of each value,
//! so a result costs one allocation per row instead of one per value, and a
//! value is handed out exactly as PostgreSQL printed it.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::{DataRowBody, RowDescriptionBody};

/// One column of a result, as RowDescription describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// Column name (or alias).
    pub name: String,
    /// OID of the column's data type.
    pub type_oid: u32,
    /// OID of the table the column comes from, 0 when it is computed.
    pub table_oid: u32,
    /// Attribute number within that table, 0 when computed.
    pub column_id: i16,
    /// `pg_type.typlen`: negative for variable-width types.
    pub type_size: i16,
    /// `pg_attribute.atttypmod`: type-specific (e.g. varchar length + 4), -1 when none.
    pub type_modifier: i32,
}

/// One row: each value is PostgreSQL's text output, or NULL.
#[derive(Clone, Debug)]
pub struct Row {
    buffer: Bytes,
    ranges: Vec<Option<Range<usize>>>,
}

impl Row {
    pub(crate) fn parse(body: &DataRowBody) -> std::io::Result<Row> {
        let ranges = body.ranges().collect()?;
        Ok(Row {
            buffer: body.buffer_bytes().clone(),
            ranges,
        })
    }

    /// Number of values in the row.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// True for a row without columns (`SELECT` with an empty target list).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The raw bytes of value `index`, `None` for NULL (or an index out of range).
    pub fn bytes(&self, index: usize) -> Option<&[u8]> {
        let range = self.ranges.get(index)?.as_ref()?;
        Some(&self.buffer[range.clone()])
    }

    /// Value `index` as text, `None` for NULL. Borrowed unless the server sent
    /// invalid UTF-8 (only possible in a `SQL_ASCII` database), which is then
    /// replaced with U+FFFD.
    pub fn get(&self, index: usize) -> Option<Cow<'_, str>> {
        self.bytes(index).map(String::from_utf8_lossy)
    }

    /// Iterates over the values in column order.
    pub fn values(&self) -> impl Iterator<Item = Option<Cow<'_, str>>> {
        (0..self.len()).map(|i| self.get(i))
    }

    /// The row as owned strings, convenient in tests.
    pub fn to_vec(&self) -> Vec<Option<String>> {
        self.values().map(|v| v.map(Cow::into_owned)).collect()
    }

    /// Bytes the row occupies on the wire (for result size limits).
    pub fn wire_size(&self) -> usize {
        self.buffer.len()
    }
}

/// The outcome of one statement.
#[derive(Clone, Debug, Default)]
pub struct QueryResult {
    /// Columns; empty for statements that return no rows.
    pub fields: Vec<Field>,
    /// Rows in text format.
    pub rows: Vec<Row>,
    /// The command tag, e.g. `SELECT 3`, `INSERT 0 1`, `UPDATE 2`; empty for an empty query.
    pub command_tag: String,
}

impl QueryResult {
    /// The first word of the command tag (`SELECT`, `INSERT`, ...).
    pub fn command(&self) -> &str {
        self.command_tag.split(' ').next().unwrap_or("")
    }

    /// The row count the tag reports (`INSERT oid rows` uses its third word), if any.
    pub fn row_count(&self) -> Option<u64> {
        let mut words = self.command_tag.split(' ');
        let count = match words.next()? {
            "INSERT" => words.nth(1),
            _ => words.next(),
        };
        count?.parse().ok()
    }

    /// All rows as owned strings, convenient in tests.
    pub fn rows_as_strings(&self) -> Vec<Vec<Option<String>>> {
        self.rows.iter().map(Row::to_vec).collect()
    }
}

pub(crate) fn parse_fields(body: &RowDescriptionBody) -> std::io::Result<Vec<Field>> {
    body.fields()
        .map(|f| {
            Ok(Field {
                name: f.name().to_owned(),
                type_oid: f.type_oid(),
                table_oid: f.table_oid(),
                column_id: f.column_id(),
                type_size: f.type_size(),
                type_modifier: f.type_modifier(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(tag: &str) -> QueryResult {
        QueryResult {
            command_tag: tag.to_owned(),
            ..QueryResult::default()
        }
    }

    #[test]
    fn row_counts_come_from_the_command_tag() {
        let cases = [
            ("SELECT 3", "SELECT", Some(3)),
            ("INSERT 0 7", "INSERT", Some(7)),
            ("UPDATE 0", "UPDATE", Some(0)),
            ("CREATE TABLE", "CREATE", None),
            ("", "", None),
        ];
        for (tag, command, count) in cases {
            assert_eq!(tagged(tag).command(), command, "{tag}");
            assert_eq!(tagged(tag).row_count(), count, "{tag}");
        }
    }
}
