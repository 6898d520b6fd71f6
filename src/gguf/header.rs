//! A walk over a GGUF header that says precisely where it breaks (which metadata key is cut
//! short, which tensor has a type osp cannot dequantize). Used only to explain a failure of
//! candle's reader, whose messages name neither.

/// ggml tensor types candle dequantizes (the ids of `ggml_type`).
const KNOWN_TYPES: [(u32, &str); 15] = [
    (0, "F32"),
    (1, "F16"),
    (2, "Q4_0"),
    (3, "Q4_1"),
    (6, "Q5_0"),
    (7, "Q5_1"),
    (8, "Q8_0"),
    (9, "Q8_1"),
    (10, "Q2_K"),
    (11, "Q3_K"),
    (12, "Q4_K"),
    (13, "Q5_K"),
    (14, "Q6_K"),
    (15, "Q8_K"),
    (30, "BF16"),
];

/// Names of ggml types osp cannot read, for the message.
fn other_type_name(t: u32) -> &'static str {
    match t {
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => "unknown",
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
    wide: bool,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|s| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        })
    }
    fn len(&mut self) -> Option<u64> {
        if self.wide {
            self.u64()
        } else {
            self.u32().map(u64::from)
        }
    }
    fn string(&mut self) -> Option<String> {
        let n = usize::try_from(self.len()?).ok()?;
        self.take(n)
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }
    /// Skips one metadata value of type `t`; Err(reason) for a bad type, None when cut short.
    fn skip_value(&mut self, t: u32, depth: usize) -> Result<Option<()>, String> {
        let fixed = match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        };
        if let Some(n) = fixed {
            return Ok(self.take(n).map(|_| ()));
        }
        match t {
            8 => Ok(self.string().map(|_| ())),
            9 if depth < 8 => {
                let Some(et) = self.u32() else {
                    return Ok(None);
                };
                let Some(n) = self.len() else {
                    return Ok(None);
                };
                for _ in 0..n {
                    if self.skip_value(et, depth + 1)?.is_none() {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            }
            _ => Err(format!("metadata value type {t} is not a GGUF type")),
        }
    }
}

/// Why `bytes` is not a GGUF file osp can read, naming the key or tensor; None when the
/// header walks cleanly.
pub fn diagnose(bytes: &[u8]) -> Option<String> {
    let mut c = Cursor {
        b: bytes,
        at: 0,
        wide: true,
    };
    match c.take(4) {
        Some(b"GGUF") => {}
        Some(m) => return Some(format!("not a GGUF file (magic {m:?}, expected \"GGUF\")")),
        None => {
            return Some(format!(
                "truncated: {} bytes, not even a GGUF magic",
                bytes.len()
            ))
        }
    }
    let Some(version) = c.u32() else {
        return Some("truncated in the header (version)".into());
    };
    match version {
        1 => c.wide = false,
        2 | 3 => {}
        v => return Some(format!("GGUF version {v} is not supported (1, 2 or 3)")),
    }
    let (Some(n_tensors), Some(n_kv)) = (c.len(), c.len()) else {
        return Some("truncated in the header (tensor and metadata counts)".into());
    };
    let mut last = String::from("(none)");
    for i in 0..n_kv {
        let Some(key) = c.string() else {
            return Some(format!(
                "truncated in metadata entry {i} of {n_kv} (after key `{last}`)"
            ));
        };
        let Some(t) = c.u32() else {
            return Some(format!("truncated in the type of metadata key `{key}`"));
        };
        match c.skip_value(t, 0) {
            Err(why) => return Some(format!("metadata key `{key}`: {why}")),
            Ok(None) => return Some(format!("truncated in the value of metadata key `{key}`")),
            Ok(Some(())) => {}
        }
        last = key;
    }
    for i in 0..n_tensors {
        let Some(name) = c.string() else {
            return Some(format!("truncated in tensor info {i} of {n_tensors}"));
        };
        let Some(nd) = c.u32() else {
            return Some(format!("truncated in the info of tensor `{name}`"));
        };
        if nd > 4 {
            return Some(format!("tensor `{name}` has {nd} dimensions (at most 4)"));
        }
        for _ in 0..nd {
            if c.len().is_none() {
                return Some(format!("truncated in the shape of tensor `{name}`"));
            }
        }
        let Some(t) = c.u32() else {
            return Some(format!("truncated in the type of tensor `{name}`"));
        };
        if !KNOWN_TYPES.iter().any(|(k, _)| *k == t) {
            let known: Vec<&str> = KNOWN_TYPES.iter().map(|(_, n)| *n).collect();
            return Some(format!(
                "tensor `{name}` has ggml type {t} ({}), which osp cannot dequantize (it reads {})",
                other_type_name(t),
                known.join(", ")
            ));
        }
        if c.u64().is_none() {
            return Some(format!("truncated in the offset of tensor `{name}`"));
        }
    }
    None
}
