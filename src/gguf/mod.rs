//! GGUF checkpoints (llama.cpp, Ollama): the container is read by candle-core's
//! `quantized::gguf_file`; this module adds errors that name the file, the metadata key or
//! the tensor, the model ([`weights`]) and the tokenizer ([`vocab`]) from the metadata.
pub mod header;
pub mod vocab;
pub mod weights;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{Device, Tensor};
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

/// Whether `path` names a GGUF file (by extension, or by its magic bytes).
pub fn is_gguf(path: &Path) -> bool {
    if path.is_dir() {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// An opened GGUF file: its metadata and tensor directory, and a reader for the tensor data.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: Content,
    reader: BufReader<File>,
    file_len: u64,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let file_len = file
            .metadata()
            .with_context(|| format!("cannot stat {}", path.display()))?
            .len();
        let mut reader = BufReader::new(file);
        let content = match Content::read(&mut reader) {
            Ok(c) => c,
            Err(e) => {
                // candle's message does not say which key or tensor broke it: walk the
                // header ourselves for a precise one.
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                match header::diagnose(&bytes) {
                    Some(why) => bail!("{}: {why}", path.display()),
                    None => bail!("{}: not a readable GGUF file: {e}", path.display()),
                }
            }
        };
        let mut f = Self {
            path: path.to_path_buf(),
            content,
            reader,
            file_len,
        };
        f.check_tensor_ranges()?;
        Ok(f)
    }

    /// Every tensor's data must lie inside the file (a truncated download otherwise fails
    /// deep inside dequantisation).
    fn check_tensor_ranges(&mut self) -> Result<()> {
        let mut names: Vec<&String> = self.content.tensor_infos.keys().collect();
        names.sort();
        for name in names {
            let info = &self.content.tensor_infos[name];
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                bail!(
                    "{}: tensor `{name}` has {elems} elements, not a multiple of the {:?} block size {block}",
                    self.path.display(),
                    info.ggml_dtype
                );
            }
            let bytes = (elems / block) as u64 * info.ggml_dtype.type_size() as u64;
            let start = self.content.tensor_data_offset.saturating_add(info.offset);
            let end = start.saturating_add(bytes);
            if end > self.file_len {
                bail!(
                    "{}: truncated: tensor `{name}` needs bytes {start}..{end} but the file has {} bytes",
                    self.path.display(),
                    self.file_len
                );
            }
        }
        Ok(())
    }

    /// A metadata value, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn missing(&self, key: &str) -> anyhow::Error {
        anyhow!("{}: metadata key `{key}` is missing", self.path.display())
    }

    fn wrong(&self, key: &str, want: &str, v: &Value) -> anyhow::Error {
        anyhow!(
            "{}: metadata key `{key}`: expected {want}, found {:?}",
            self.path.display(),
            v.value_type()
        )
    }

    /// An unsigned integer of any width.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let n: Option<u64> = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.map(|n| Some(n as usize))
            .ok_or_else(|| self.wrong(key, "a non-negative integer", v))
    }

    pub fn req_usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v {
            Value::F32(x) => Ok(Some(*x as f64)),
            Value::F64(x) => Ok(Some(*x)),
            _ => Err(self.wrong(key, "a float", v)),
        }
    }

    pub fn req_f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.wrong(key, "a boolean", v)),
        }
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.wrong(key, "a string", v)),
        }
    }

    pub fn req_str(&self, key: &str) -> Result<&str> {
        self.opt_str(key)?.ok_or_else(|| self.missing(key))
    }

    fn array(&self, key: &str) -> Result<Option<&Vec<Value>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.wrong(key, "an array", v)),
        }
    }

    pub fn opt_str_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.as_str()),
                _ => Err(anyhow!(
                    "{}: metadata key `{key}`: element {i} is {:?}, expected a string",
                    self.path.display(),
                    v.value_type()
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub fn opt_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::F32(x) => Ok(*x),
                Value::F64(x) => Ok(*x as f32),
                _ => Err(anyhow!(
                    "{}: metadata key `{key}`: element {i} is {:?}, expected a float",
                    self.path.display(),
                    v.value_type()
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    pub fn opt_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::I32(x) => Ok(*x as i64),
                Value::U32(x) => Ok(*x as i64),
                Value::I8(x) => Ok(*x as i64),
                Value::U8(x) => Ok(*x as i64),
                Value::I16(x) => Ok(*x as i64),
                Value::U16(x) => Ok(*x as i64),
                Value::I64(x) => Ok(*x),
                _ => Err(anyhow!(
                    "{}: metadata key `{key}`: element {i} is {:?}, expected an integer",
                    self.path.display(),
                    v.value_type()
                )),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Shape (PyTorch order: rows first) of a tensor, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.content.tensor_infos.get(name).map(|i| i.shape.dims())
    }

    /// Dequantises a tensor to f32.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<Tensor> {
        let q = self
            .content
            .tensor(&mut self.reader, name, device)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.path.display()))?;
        q.dequantize(device).map_err(|e| {
            anyhow!(
                "{}: tensor `{name}`: cannot dequantize: {e}",
                self.path.display()
            )
        })
    }
}
