//! Record files: JSON Lines, or one JSON array, optionally gzip-compressed.
//!
//! Every record keeps the line it starts on, so that each problem found later (a missing
//! field, a bad value) can be reported as `file:line: what is wrong`, which is what a user
//! needs to fix a data set of many thousand rows.

use std::fmt;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::tokenizer::ChatMessage;

/// The longest record (one JSON Lines line, or one element of a JSON array) a data file may
/// hold: 4 MiB, about a million tokens of text, far beyond any context window. A longer
/// record is malformed (`file:line: record of N bytes exceeds ...`, following
/// [`OnMalformed`]) and is neither parsed nor tokenized: a 50 MB line used to take a minute
/// and 2.3 GB of memory before being truncated to `max_len` tokens.
pub const MAX_RECORD_BYTES: usize = 4 << 20;

fn too_long(bytes: usize) -> String {
    format!(
        "record of {bytes} bytes exceeds the {} MiB limit on one record (MAX_RECORD_BYTES)",
        MAX_RECORD_BYTES >> 20
    )
}

/// What a loader does with a record it cannot use (bad JSON, a missing field, a wrong type,
/// a value out of range, a record over [`MAX_RECORD_BYTES`]).
///
/// `Skip` (the default of every config's `data.on_malformed`) drops it, keeps a warning
/// (`file:line: reason`; the trainers print the first ones and name the first problem when
/// nothing usable is left) and goes on, for large public data sets with a few bad rows;
/// `Abort` stops at the first such record, so that a shrunken data set is never trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMalformed {
    #[default]
    Skip,
    Abort,
}

/// A record that could not be used: the file, the 1-based line the record starts on and
/// the reason. Loaders return it (inside `anyhow::Error`) under [`OnMalformed::Abort`];
/// its `Display` is the warning text under [`OnMalformed::Skip`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}: {reason}")]
pub struct RecordError {
    pub file: String,
    pub line: usize,
    pub reason: String,
}

/// One JSON value of a record file and the 1-based line it starts on.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub line: usize,
    pub value: Value,
}

/// The records of one file, plus the warnings for those skipped under
/// [`OnMalformed::Skip`].
#[derive(Debug, Clone)]
pub struct Records {
    /// The path as given, used in every `file:line` message.
    pub file: String,
    pub records: Vec<Record>,
    pub warnings: Vec<String>,
}

impl Records {
    /// `file:line` of a record of this file.
    pub fn source(&self, line: usize) -> String {
        format!("{}:{line}", self.file)
    }
}

/// Read every record of `path`.
///
/// The layout is found from the content, not the name: gzip data (magic bytes `1f 8b`)
/// are decompressed first; a file whose first non-blank character is `[` is one JSON
/// array of records (each element's line is where it starts); anything else is JSON
/// Lines, one value a line, blank lines ignored. A UTF-8 byte-order mark is ignored.
///
/// A record that is not valid JSON follows `on_malformed`. A JSON array whose brackets or
/// strings do not balance cannot be split into records, so it is always an error.
pub fn read_records(path: &Path, on_malformed: OnMalformed) -> Result<Records> {
    let (records, diag) = open(path, on_malformed)?;
    let file = diag.file.clone();
    Ok(Records {
        file,
        records,
        warnings: diag.finish()?,
    })
}

/// Read `path` for a loader. Under `Abort`, the first unreadable line is held back until
/// the loader passes it ([`Diagnostics::reached`], [`Diagnostics::finish`]), so that the
/// error reported is the first problem in file order, whatever its kind.
pub(crate) fn open(path: &Path, on_malformed: OnMalformed) -> Result<(Vec<Record>, Diagnostics)> {
    let file = path.display().to_string();
    let bytes = read_maybe_gz(path)?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut diag = Diagnostics::new(file, on_malformed);
    diag.defer = true;
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    let records = if first == Some(&b'[') {
        read_array(bytes, &mut diag)?
    } else {
        read_lines(bytes, &mut diag)?
    };
    diag.defer = false;
    Ok((records, diag))
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if !raw.starts_with(&[0x1f, 0x8b]) {
        return Ok(raw);
    }
    let mut out = Vec::with_capacity(raw.len().saturating_mul(4));
    flate2::read::MultiGzDecoder::new(raw.as_slice())
        .read_to_end(&mut out)
        .with_context(|| format!("decompressing {} (gzip)", path.display()))?;
    Ok(out)
}

fn read_lines(bytes: &[u8], diag: &mut Diagnostics) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if line.len() > MAX_RECORD_BYTES {
            diag.malformed(i + 1, too_long(line.len()))?;
            continue;
        }
        match serde_json::from_slice::<Value>(line) {
            Ok(value) => out.push(Record { line: i + 1, value }),
            Err(e) => diag.malformed(i + 1, json_reason(&e, false))?,
        }
    }
    Ok(out)
}

fn read_array(bytes: &[u8], diag: &mut Diagnostics) -> Result<Vec<Record>> {
    let lines = LineIndex::new(bytes);
    let spans = array_elements(bytes).map_err(|(at, reason)| RecordError {
        file: diag.file.clone(),
        line: lines.line_of(at),
        reason,
    })?;
    let mut out = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        let line = lines.line_of(start);
        if end - start > MAX_RECORD_BYTES {
            diag.malformed(line, too_long(end - start))?;
            continue;
        }
        match serde_json::from_slice::<Value>(&bytes[start..end]) {
            Ok(value) => out.push(Record { line, value }),
            Err(e) => {
                // Point at the line of the error inside a multi-line element.
                let at = line + e.line().saturating_sub(1);
                diag.malformed(at, json_reason(&e, true))?
            }
        }
    }
    Ok(out)
}

/// serde_json's message without its `at line L column C` suffix (the caller names the
/// line itself); the column is kept because a JSON Lines row can be very long.
fn json_reason(e: &serde_json::Error, multiline: bool) -> String {
    let msg = e.to_string();
    let msg = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
    if multiline && e.line() > 1 {
        format!("invalid JSON: {msg} (column {})", e.column())
    } else {
        format!("invalid JSON: {msg} at column {}", e.column())
    }
}

/// Byte ranges of the elements of the top-level JSON array in `bytes`, found by tracking
/// strings and nesting only (each element is parsed afterwards), or the byte offset and
/// reason of a structural error.
fn array_elements(bytes: &[u8]) -> std::result::Result<Vec<(usize, usize)>, (usize, String)> {
    let open = bytes
        .iter()
        .position(|&b| b == b'[')
        .ok_or((0, "expected a JSON array".to_string()))?;
    let mut spans = Vec::new();
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut start: Option<usize> = None;
    let mut after_comma: Option<usize> = None;
    let mut string_start = 0usize;
    for (p, &b) in bytes.iter().enumerate().skip(open + 1) {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        if b.is_ascii_whitespace() {
            continue;
        }
        if depth == 0 {
            match b {
                b',' => {
                    let s = start
                        .take()
                        .ok_or((p, "unexpected `,` in the array".to_string()))?;
                    spans.push((s, p));
                    after_comma = Some(p);
                    continue;
                }
                b']' => {
                    if let Some(s) = start.take() {
                        spans.push((s, p));
                    } else if let Some(c) = after_comma {
                        return Err((c, "trailing `,` before the end of the array".to_string()));
                    }
                    return match bytes[p + 1..].iter().position(|b| !b.is_ascii_whitespace()) {
                        None => Ok(spans),
                        Some(q) => Err((
                            p + 1 + q,
                            "unexpected data after the end of the JSON array".to_string(),
                        )),
                    };
                }
                b'}' => return Err((p, "unexpected `}` in the array".to_string())),
                _ => {
                    if start.is_none() {
                        start = Some(p);
                        after_comma = None;
                    }
                }
            }
        }
        match b {
            b'"' => {
                in_string = true;
                string_start = p;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    if in_string {
        Err((string_start, "unterminated string".to_string()))
    } else {
        Err((
            start.unwrap_or(open),
            "unterminated JSON array (no closing `]`)".to_string(),
        ))
    }
}

/// Byte offset -> 1-based line number.
struct LineIndex {
    newlines: Vec<usize>,
}

impl LineIndex {
    fn new(bytes: &[u8]) -> Self {
        let newlines = bytes
            .iter()
            .enumerate()
            .filter(|(_, &b)| b == b'\n')
            .map(|(i, _)| i)
            .collect();
        Self { newlines }
    }

    fn line_of(&self, offset: usize) -> usize {
        self.newlines.partition_point(|&n| n < offset) + 1
    }
}

/// Applies an [`OnMalformed`] policy for one file and collects its warnings.
pub(crate) struct Diagnostics {
    pub file: String,
    policy: OnMalformed,
    pub warnings: Vec<String>,
    /// While reading under `Abort`: hold the first error instead of returning it.
    defer: bool,
    pending: Option<RecordError>,
}

impl Diagnostics {
    fn new(file: String, policy: OnMalformed) -> Self {
        Self {
            file,
            policy,
            warnings: Vec::new(),
            defer: false,
            pending: None,
        }
    }

    /// A record that cannot be used: an error under `Abort`, a warning under `Skip`.
    pub fn malformed(&mut self, line: usize, reason: impl fmt::Display) -> Result<()> {
        let err = RecordError {
            file: self.file.clone(),
            line,
            reason: reason.to_string(),
        };
        match self.policy {
            OnMalformed::Skip => {
                self.warnings.push(err.to_string());
                Ok(())
            }
            OnMalformed::Abort if self.defer => {
                self.pending.get_or_insert(err);
                Ok(())
            }
            OnMalformed::Abort => Err(err.into()),
        }
    }

    /// Call before handling the record on `line`: fails with a held-back read error from
    /// an earlier line.
    pub fn reached(&mut self, line: usize) -> Result<()> {
        match self.pending.take() {
            Some(e) if e.line < line => Err(e.into()),
            other => {
                self.pending = other;
                Ok(())
            }
        }
    }

    /// The record on `line`: [`reached`](Self::reached), then `parse` it; a parse error is
    /// [`malformed`](Self::malformed) and gives `None` (skip the record).
    pub fn record<T, E: fmt::Display>(
        &mut self,
        line: usize,
        parse: impl FnOnce() -> std::result::Result<T, E>,
    ) -> Result<Option<T>> {
        self.reached(line)?;
        match parse() {
            Ok(v) => Ok(Some(v)),
            Err(reason) => {
                self.malformed(line, reason)?;
                Ok(None)
            }
        }
    }

    /// The warnings, or the held-back read error that no record came after.
    pub fn finish(mut self) -> Result<Vec<String>> {
        match self.pending.take() {
            Some(e) => Err(e.into()),
            None => Ok(self.warnings),
        }
    }

    /// A warning that does not depend on the policy (truncation, an empty example).
    pub fn warn(&mut self, line: usize, msg: impl fmt::Display) {
        self.warnings.push(format!("{}:{line}: {msg}", self.file));
    }

    pub fn source(&self, line: usize) -> String {
        format!("{}:{line}", self.file)
    }
}

// ---------------------------------------------------------------------------------------
// Field access with messages that say what is wrong.

pub(crate) fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn as_object(v: &Value) -> std::result::Result<&Map<String, Value>, String> {
    v.as_object()
        .ok_or_else(|| format!("expected a JSON object, found {}", type_name(v)))
}

pub(crate) fn field<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> std::result::Result<&'a Value, String> {
    obj.get(key).ok_or_else(|| format!("missing field `{key}`"))
}

pub(crate) fn str_field<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> std::result::Result<&'a str, String> {
    let v = field(obj, key)?;
    v.as_str()
        .ok_or_else(|| format!("field `{key}` must be a string, found {}", type_name(v)))
}

/// A list of `{"role", "content"}` messages (both strings), named `what` in messages.
pub(crate) fn messages(v: &Value, what: &str) -> std::result::Result<Vec<ChatMessage>, String> {
    let arr = v.as_array().ok_or_else(|| {
        format!(
            "field `{what}` must be a list of messages, found {}",
            type_name(v)
        )
    })?;
    if arr.is_empty() {
        return Err(format!("field `{what}` is an empty list of messages"));
    }
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let obj = m.as_object().ok_or_else(|| {
                format!(
                    "`{what}[{i}]` must be a {{\"role\", \"content\"}} object, found {}",
                    type_name(m)
                )
            })?;
            let get = |k: &str| str_field(obj, k).map_err(|e| format!("`{what}[{i}]`: {e}"));
            Ok(ChatMessage::new(get("role")?, get("content")?))
        })
        .collect()
}
