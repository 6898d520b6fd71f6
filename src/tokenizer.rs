//! Tokenizers: Hugging Face `tokenizer.json` (plus its config files and chat template) and
//! Karpathy's llama2.c `tokenizer.bin` format, behind one [`Tokenizer`] type.
//!
//! The llama2.c tokenizer reproduces `run.c` exactly (encode: dummy prefix, per-codepoint
//! lookup with byte fallback, greedy highest-score pair merging; decode: byte pieces,
//! leading-space stripping after BOS). Merging uses a priority queue instead of run.c's
//! quadratic rescans, with the same tie-breaking (highest score, then leftmost pair).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// One chat turn, as passed to a chat template (`messages` in Jinja).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A text tokenizer: either a Hugging Face `tokenizers` tokenizer or a llama2.c one.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Inner,
    /// The file (or folder) the tokenizer was loaded from, for error messages.
    source: PathBuf,
    vocab_size: usize,
    bos: Option<u32>,
    eos: Vec<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    /// Whether a sequence starts with BOS, by the tokenizer's own rules (see
    /// [`Tokenizer::encode`]).
    add_bos: bool,
    chat: Option<ChatTemplate>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind())
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("unk", &self.unk)
            .field("add_bos", &self.add_bos)
            .field("chat_template", &self.chat)
            .finish()
    }
}

#[derive(Clone)]
enum Inner {
    Hf(Box<tokenizers::Tokenizer>),
    Llama2c(Llama2c),
}

const TOKENIZER_JSON: &str = "tokenizer.json";
const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
const GENERATION_CONFIG: &str = "generation_config.json";
const MODEL_CONFIG: &str = "config.json";
const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
const CHAT_TEMPLATE_JSON: &str = "chat_template.json";

/// Names tried (in order) when no config says which token is BOS / EOS / PAD.
/// Only tokens registered as added tokens in tokenizer.json are accepted, so that a
/// plain BPE piece such as the HTML tag `</s>` is never mistaken for a special token.
const BOS_NAMES: &[&str] = &["<s>", "<|begin_of_text|>", "<bos>", "<|endoftext|>"];
const EOS_NAMES: &[&str] = &[
    "</s>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<eos>",
    "<end_of_turn>",
];
const PAD_NAMES: &[&str] = &["<pad>", "<|pad|>", "[PAD]"];
const UNK_NAMES: &[&str] = &["<unk>", "[UNK]"];

impl Tokenizer {
    /// A Hugging Face model folder: `tokenizer.json` (required), and optionally
    /// `tokenizer_config.json`, `special_tokens_map.json`, `generation_config.json` and
    /// `config.json` for bos/eos/pad, and the chat template from `chat_template.jinja`,
    /// `tokenizer_config.json` (`chat_template`) or `chat_template.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "{}: not a directory (expected a Hugging Face model folder containing {TOKENIZER_JSON})",
                dir.display()
            );
        }
        let tok_path = dir.join(TOKENIZER_JSON);
        if !tok_path.is_file() {
            bail!(
                "{}: not found (a Hugging Face model folder must contain {TOKENIZER_JSON})",
                tok_path.display()
            );
        }
        let hf = load_hf_json(&tok_path)?;
        let configs = HfConfigs::load(dir)?;
        let vocab = HfVocab::new(&hf);
        let specials = configs.resolve_specials(&hf, &vocab)?;
        let chat = configs.chat_template(dir, &specials)?;
        let add_bos = configs.add_bos(&hf, specials.bos)?;
        Ok(Self {
            inner: Inner::Hf(Box::new(hf)),
            source: dir.to_path_buf(),
            vocab_size: vocab.size,
            bos: specials.bos,
            eos: specials.eos,
            pad: specials.pad,
            unk: specials.unk,
            add_bos,
            chat,
        })
    }

    /// A tokenizer given as the contents of `tokenizer.json` and `tokenizer_config.json`
    /// (as built from a GGUF file's metadata); `source` names where they came from.
    pub fn from_hf_values(
        tokenizer_json: &Json,
        tokenizer_config: &Json,
        source: &Path,
    ) -> Result<Self> {
        let hf: tokenizers::Tokenizer = serde_json::from_value(tokenizer_json.clone())
            .map_err(|e| anyhow!("{}: building the tokenizer: {e}", source.display()))?;
        let configs = HfConfigs {
            tokenizer_config: Some(ConfigFile {
                path: source.to_path_buf(),
                json: tokenizer_config.clone(),
            }),
            ..HfConfigs::default()
        };
        let vocab = HfVocab::new(&hf);
        let specials = configs.resolve_specials(&hf, &vocab)?;
        let chat = match &configs.tokenizer_config {
            Some(cfg) => {
                template_field(cfg)?.map(|(origin, src)| ChatTemplate::new(origin, src, &specials))
            }
            None => None,
        };
        let add_bos = configs.add_bos(&hf, specials.bos)?;
        Ok(Self {
            inner: Inner::Hf(Box::new(hf)),
            source: source.to_path_buf(),
            vocab_size: vocab.size,
            bos: specials.bos,
            eos: specials.eos,
            pad: specials.pad,
            unk: specials.unk,
            add_bos,
            chat,
        })
    }

    /// A bare `tokenizer.json` file. With no config files, BOS/EOS/PAD are found from
    /// common names (`<s>`, `</s>`, `<|endoftext|>`, `<|im_end|>`, ...) among the added
    /// tokens, when present; there is no chat template.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        if !path.is_file() {
            bail!("{}: tokenizer file not found", path.display());
        }
        let hf = load_hf_json(path)?;
        let vocab = HfVocab::new(&hf);
        let configs = HfConfigs::default();
        let specials = configs.resolve_specials(&hf, &vocab)?;
        let add_bos = configs.add_bos(&hf, specials.bos)?;
        Ok(Self {
            inner: Inner::Hf(Box::new(hf)),
            source: path.to_path_buf(),
            vocab_size: vocab.size,
            bos: specials.bos,
            eos: specials.eos,
            pad: specials.pad,
            unk: specials.unk,
            add_bos,
            chat: None,
        })
    }

    /// A llama2.c `tokenizer.bin`: int32 max_token_length, then `vocab_size` records of
    /// (f32 score, int32 len, len bytes), little endian. `vocab_size` comes from the model
    /// header. BOS is 1, EOS is 2, there is no PAD.
    pub fn from_llama2c(path: &Path, vocab_size: usize) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("reading llama2.c tokenizer {}", path.display()))?;
        // One-level message so that even `{}` shows both the file and the token index.
        let l2c = Llama2c::parse(&bytes, vocab_size)
            .map_err(|e| anyhow!("parsing llama2.c tokenizer {}: {e:#}", path.display()))?;
        Ok(Self {
            inner: Inner::Llama2c(l2c),
            source: path.to_path_buf(),
            vocab_size,
            bos: Some(LLAMA2C_BOS),
            // llama2.c's run.c ends a story when BOS is sampled: the training data delimit
            // stories with BOS, so the models rarely emit EOS. Both end generation.
            eos: vec![LLAMA2C_EOS, LLAMA2C_BOS],
            pad: None,
            unk: Some(LLAMA2C_UNK),
            // run.c starts every sequence with BOS.
            add_bos: true,
            chat: None,
        })
    }

    /// Encode `text`. `add_bos` says that the text starts a sequence: BOS is then prepended
    /// when the tokenizer's own rules add one ([`Tokenizer::adds_bos`]) and the text does not
    /// already begin with it (a rendered chat template often writes the BOS text itself:
    /// ChatML models such as SmolLM2 use `<|im_start|>` as BOS). EOS is never added. Special
    /// tokens written in the text (such as `<|im_start|>`) are recognised by Hugging Face
    /// tokenizers, not by llama2.c ones.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let add_bos = add_bos && self.add_bos;
        match &self.inner {
            Inner::Hf(hf) => {
                let enc = hf.encode(text, false).map_err(|e| {
                    anyhow!(
                        "encoding {} chars with {}: {e}",
                        text.len(),
                        self.source.display()
                    )
                })?;
                let mut ids = Vec::with_capacity(enc.len() + 1);
                if add_bos && enc.get_ids().first() != self.bos.as_ref() {
                    ids.extend(self.bos);
                }
                ids.extend_from_slice(enc.get_ids());
                Ok(ids)
            }
            Inner::Llama2c(l2c) => l2c
                .encode(text, add_bos)
                .with_context(|| format!("encoding with {}", self.source.display())),
        }
    }

    /// Decode ids to text, dropping the BOS, EOS and PAD tokens. Invalid UTF-8 (for
    /// example a sequence cut inside a multi-byte character) is replaced by U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            bail!(
                "decoding with {}: token id {bad} is out of range (vocab size {})",
                self.source.display(),
                self.vocab_size
            );
        }
        match &self.inner {
            Inner::Hf(hf) => {
                let kept: Vec<u32> = ids
                    .iter()
                    .copied()
                    .filter(|&id| !self.is_skipped_special(id))
                    .collect();
                hf.decode(&kept, false)
                    .map_err(|e| anyhow!("decoding with {}: {e}", self.source.display()))
            }
            Inner::Llama2c(l2c) => Ok(l2c.decode(ids)),
        }
    }

    fn is_skipped_special(&self, id: u32) -> bool {
        self.bos == Some(id) || self.pad == Some(id) || self.eos.contains(&id)
    }

    /// Number of ids the tokenizer can produce (max id + 1, added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether a sequence starts with BOS: `add_bos_token` in tokenizer_config.json when it
    /// says, else whether tokenizer.json's post-processor adds BOS (what transformers does);
    /// always for llama2.c (run.c); the GGUF `tokenizer.ggml.add_bos_token` flag for GGUF.
    pub fn adds_bos(&self) -> bool {
        self.add_bos && self.bos.is_some()
    }

    /// The BOS id a sequence starts with, when the tokenizer adds one.
    pub fn sequence_bos(&self) -> Option<u32> {
        self.bos.filter(|_| self.add_bos)
    }

    /// All end-of-sequence ids; the first is the primary one (the tokenizer's own
    /// `eos_token`), followed by extra ones from generation_config.json / config.json.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Id of a vocabulary entry (exact piece). For llama2.c tokenizers `<s>`, `</s>` and
    /// `<unk>` also name ids 1, 2 and 0 (their pieces are stored as `"\n<s>\n"` etc).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match &self.inner {
            Inner::Hf(hf) => hf.token_to_id(token),
            Inner::Llama2c(l2c) => l2c.lookup.get(token.as_bytes()).copied().or(match token {
                "<unk>" => Some(LLAMA2C_UNK),
                "<s>" => Some(LLAMA2C_BOS),
                "</s>" => Some(LLAMA2C_EOS),
                _ => None,
            }),
        }
    }

    /// The vocabulary entry of `id` (for llama2.c, the raw piece decoded lossily).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        match &self.inner {
            Inner::Hf(hf) => hf.id_to_token(id),
            Inner::Llama2c(l2c) => l2c
                .pieces
                .get(id as usize)
                .map(|p| String::from_utf8_lossy(p).into_owned()),
        }
    }

    /// The id of `text` when it encodes (without BOS) to exactly one token.
    pub fn single_token_id(&self, text: &str) -> Result<u32> {
        let ids = self.encode(text, false)?;
        match ids.as_slice() {
            [id] => Ok(*id),
            // SentencePiece-style encoders add a dummy-prefix space to a text on its own, but
            // a continuation token is a plain vocabulary piece: accept an exact piece.
            _ if matches!(self.inner, Inner::Llama2c(_)) && self.token_to_id(text).is_some() => {
                self.token_to_id(text).ok_or_else(|| anyhow!("unreachable"))
            }
            _ => {
                let pieces: Vec<String> = ids
                    .iter()
                    .map(|&id| self.id_to_token(id).unwrap_or_else(|| format!("<id {id}>")))
                    .collect();
                bail!(
                    "{:?} is not a single token for {}: it encodes to {} tokens {:?} (pieces {:?})",
                    text,
                    self.source.display(),
                    ids.len(),
                    ids,
                    pieces
                )
            }
        }
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// Render the chat template (Hugging Face conventions: `trim_blocks`, `lstrip_blocks`,
    /// Python string/dict methods, `raise_exception`, `strftime_now`, and the variables
    /// `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, `pad_token`,
    /// `unk_token`). The result usually already contains the BOS token text when the
    /// model uses one, so encode it with `add_bos = false`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let Some(chat) = &self.chat else {
            bail!(
                "{} has no chat template (looked for {CHAT_TEMPLATE_JINJA}, `chat_template` in {TOKENIZER_CONFIG}, {CHAT_TEMPLATE_JSON})",
                self.source.display()
            );
        };
        chat.render(messages, add_generation_prompt)
    }

    /// `"huggingface"` or `"llama2.c"`.
    pub fn kind(&self) -> &'static str {
        match self.inner {
            Inner::Hf(_) => "huggingface",
            Inner::Llama2c(_) => "llama2.c",
        }
    }

    /// Special tokens, sorted by id: bos/eos/pad/unk and (for Hugging Face) every added
    /// token marked special.
    pub fn special_tokens(&self) -> Vec<(String, u32)> {
        let mut out: Vec<(String, u32)> = Vec::new();
        match &self.inner {
            Inner::Hf(hf) => {
                for (id, tok) in hf.get_added_tokens_decoder() {
                    if tok.special {
                        out.push((tok.content, id));
                    }
                }
                let named = self
                    .bos
                    .iter()
                    .chain(self.eos.iter())
                    .chain(self.pad.iter())
                    .chain(self.unk.iter());
                for &id in named {
                    if !out.iter().any(|(_, i)| *i == id) {
                        let name = hf.id_to_token(id).unwrap_or_else(|| format!("<id {id}>"));
                        out.push((name, id));
                    }
                }
            }
            Inner::Llama2c(_) => {
                out.push(("<unk>".to_string(), LLAMA2C_UNK));
                out.push(("<s>".to_string(), LLAMA2C_BOS));
                out.push(("</s>".to_string(), LLAMA2C_EOS));
            }
        }
        out.sort_by_key(|(_, id)| *id);
        out
    }
}

// ---------------------------------------------------------------------------------------
// Hugging Face

fn load_hf_json(path: &Path) -> Result<tokenizers::Tokenizer> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading tokenizer {}", path.display()))?;
    // tokenizers panics (an `expect` in its decoder deserialiser, 0.22) on some invalid
    // JSON, such as a file cut short inside "decoder": check the syntax first, so that the
    // error names the line and column, and turn any other panic of its parser into an error.
    if let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(&text) {
        bail!("{} is not valid JSON: {e}", path.display());
    }
    let parsed =
        std::panic::catch_unwind(|| text.parse::<tokenizers::Tokenizer>()).map_err(|_| {
            anyhow!(
                "tokenizers could not parse {} (it panicked)",
                path.display()
            )
        })?;
    parsed.map_err(|e| {
        anyhow!(
            "parsing {} as a Hugging Face tokenizer.json: {e}",
            path.display()
        )
    })
}

/// Vocabulary facts needed while resolving special tokens.
struct HfVocab {
    size: usize,
    /// Added tokens (content -> id), special or not.
    added: HashMap<String, u32>,
}

impl HfVocab {
    fn new(hf: &tokenizers::Tokenizer) -> Self {
        let size = hf
            .get_vocab(true)
            .values()
            .copied()
            .max()
            .map_or(0, |m| m as usize + 1);
        let added = hf
            .get_added_tokens_decoder()
            .into_iter()
            .map(|(id, t)| (t.content, id))
            .collect();
        Self { size, added }
    }

    fn find_by_names(&self, names: &[&str]) -> Vec<u32> {
        names
            .iter()
            .filter_map(|n| self.added.get(*n).copied())
            .collect()
    }
}

/// A JSON config file that was found and parsed.
struct ConfigFile {
    path: PathBuf,
    json: Json,
}

impl ConfigFile {
    fn load(path: PathBuf) -> Result<Option<Self>> {
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let json: Json = serde_json::from_str(&text)
            .with_context(|| format!("parsing {} as JSON", path.display()))?;
        if !json.is_object() {
            bail!(
                "{}: expected a JSON object at the top level",
                path.display()
            );
        }
        Ok(Some(Self { path, json }))
    }

    fn field(&self, name: &str) -> Option<&Json> {
        self.json.get(name)
    }

    /// A token given by name: `"<s>"`, `{"content": "<s>", ...}` or `null`.
    /// `None`: the field is absent; `Some(None)`: explicitly null.
    fn token_name(&self, field: &str) -> Result<Option<Option<String>>> {
        let Some(v) = self.field(field) else {
            return Ok(None);
        };
        match v {
            Json::Null => Ok(Some(None)),
            Json::String(s) => Ok(Some(Some(s.clone()))),
            Json::Object(m) => match m.get("content") {
                Some(Json::String(s)) => Ok(Some(Some(s.clone()))),
                _ => bail!(
                    "{}: field `{field}`: expected a string or an object with a string `content`, got {v}",
                    self.path.display()
                ),
            },
            _ => bail!(
                "{}: field `{field}`: expected a token string, got {v}",
                self.path.display()
            ),
        }
    }

    /// Token ids given as a number, a list of numbers, or null (negative ids mean none).
    /// `None`: the field is absent.
    fn token_ids(&self, field: &str, vocab_size: usize) -> Result<Option<Vec<u32>>> {
        let Some(v) = self.field(field) else {
            return Ok(None);
        };
        let one = |x: &Json| -> Result<Option<u32>> {
            if x.is_null() {
                return Ok(None);
            }
            match x.as_i64() {
                Some(i) if i < 0 => Ok(None),
                Some(i) if (i as u64) < vocab_size as u64 => Ok(Some(i as u32)),
                Some(i) => bail!(
                    "{}: field `{field}`: token id {i} is out of range for the tokenizer (vocab size {vocab_size})",
                    self.path.display()
                ),
                None => bail!(
                    "{}: field `{field}`: expected an integer token id or a list of them, got {v}",
                    self.path.display()
                ),
            }
        };
        let mut ids = Vec::new();
        match v {
            Json::Array(items) => {
                for x in items {
                    ids.extend(one(x)?);
                }
            }
            x => ids.extend(one(x)?),
        }
        Ok(Some(ids))
    }
}

#[derive(Default)]
struct HfConfigs {
    tokenizer_config: Option<ConfigFile>,
    special_tokens_map: Option<ConfigFile>,
    generation_config: Option<ConfigFile>,
    model_config: Option<ConfigFile>,
}

struct Specials {
    bos: Option<u32>,
    eos: Vec<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    /// Token strings for the chat template.
    bos_text: Option<String>,
    eos_text: Option<String>,
    pad_text: Option<String>,
    unk_text: Option<String>,
}

/// What a config file says about one special token.
enum Decl {
    Absent,
    Ids(Vec<u32>),
}

impl HfConfigs {
    fn load(dir: &Path) -> Result<Self> {
        Ok(Self {
            tokenizer_config: ConfigFile::load(dir.join(TOKENIZER_CONFIG))?,
            special_tokens_map: ConfigFile::load(dir.join(SPECIAL_TOKENS_MAP))?,
            generation_config: ConfigFile::load(dir.join(GENERATION_CONFIG))?,
            model_config: ConfigFile::load(dir.join(MODEL_CONFIG))?,
        })
    }

    /// Look up a token named by `field` in tokenizer_config.json, else in
    /// special_tokens_map.json. Returns the declaration and the token text.
    fn named(&self, hf: &tokenizers::Tokenizer, field: &str) -> Result<(Decl, Option<String>)> {
        for cfg in [&self.tokenizer_config, &self.special_tokens_map]
            .into_iter()
            .flatten()
        {
            match cfg.token_name(field)? {
                None => continue,
                Some(None) => return Ok((Decl::Ids(vec![]), None)),
                Some(Some(name)) => {
                    let id = hf.token_to_id(&name).with_context(|| {
                        format!(
                            "{}: field `{field}`: token {name:?} is not in the vocabulary of {TOKENIZER_JSON}",
                            cfg.path.display()
                        )
                    })?;
                    return Ok((Decl::Ids(vec![id]), Some(name)));
                }
            }
        }
        Ok((Decl::Absent, None))
    }

    /// Ids from generation_config.json then config.json (`<field>` such as `eos_token_id`).
    fn numeric(&self, field: &str, vocab_size: usize, all: bool) -> Result<Decl> {
        let mut decl = Decl::Absent;
        for cfg in [&self.generation_config, &self.model_config]
            .into_iter()
            .flatten()
        {
            if let Some(ids) = cfg.token_ids(field, vocab_size)? {
                match &mut decl {
                    Decl::Absent => decl = Decl::Ids(ids),
                    Decl::Ids(prev) => {
                        for id in ids {
                            if !prev.contains(&id) {
                                prev.push(id);
                            }
                        }
                    }
                }
                if !all {
                    break;
                }
            }
        }
        Ok(decl)
    }

    fn resolve_specials(&self, hf: &tokenizers::Tokenizer, vocab: &HfVocab) -> Result<Specials> {
        let text_of = |id: Option<u32>| id.and_then(|i| hf.id_to_token(i));

        // BOS: the first file that declares it wins (an explicit null means "no BOS").
        let (bos_decl, bos_name) = self.named(hf, "bos_token")?;
        let bos = match bos_decl {
            Decl::Ids(ids) => ids.first().copied(),
            Decl::Absent => match self.numeric("bos_token_id", vocab.size, false)? {
                Decl::Ids(ids) => ids.first().copied(),
                Decl::Absent => vocab.find_by_names(BOS_NAMES).first().copied(),
            },
        };

        // EOS: the tokenizer's own eos_token first, then every id from
        // generation_config.json / config.json (which may list several).
        let (eos_decl, eos_name) = self.named(hf, "eos_token")?;
        let num_decl = self.numeric("eos_token_id", vocab.size, true)?;
        let mut eos: Vec<u32> = Vec::new();
        let mut declared = false;
        for d in [eos_decl, num_decl] {
            if let Decl::Ids(ids) = d {
                declared = true;
                for id in ids {
                    if !eos.contains(&id) {
                        eos.push(id);
                    }
                }
            }
        }
        if !declared {
            eos = vocab.find_by_names(EOS_NAMES);
        }

        let (pad_decl, pad_name) = self.named(hf, "pad_token")?;
        let pad = match pad_decl {
            Decl::Ids(ids) => ids.first().copied(),
            Decl::Absent => match self.numeric("pad_token_id", vocab.size, false)? {
                Decl::Ids(ids) => ids.first().copied(),
                Decl::Absent => hf
                    .get_padding()
                    .map(|p| p.pad_id)
                    .filter(|&id| (id as usize) < vocab.size)
                    .or_else(|| vocab.find_by_names(PAD_NAMES).first().copied()),
            },
        };

        let (unk_decl, unk_name) = self.named(hf, "unk_token")?;
        let unk = match unk_decl {
            Decl::Ids(ids) => ids.first().copied(),
            Decl::Absent => vocab.find_by_names(UNK_NAMES).first().copied(),
        };

        Ok(Specials {
            bos_text: bos_name.or_else(|| text_of(bos)),
            eos_text: eos_name.or_else(|| text_of(eos.first().copied())),
            pad_text: pad_name.or_else(|| text_of(pad)),
            unk_text: unk_name.or_else(|| text_of(unk)),
            bos,
            eos,
            pad,
            unk,
        })
    }

    /// Whether the tokenizer starts sequences with BOS: `add_bos_token` in
    /// tokenizer_config.json when present (transformers rebuilds the post-processor from it),
    /// else whether tokenizer.json's post-processor prepends the BOS id.
    fn add_bos(&self, hf: &tokenizers::Tokenizer, bos: Option<u32>) -> Result<bool> {
        if let Some(cfg) = &self.tokenizer_config {
            match cfg.field("add_bos_token") {
                None | Some(Json::Null) => {}
                Some(Json::Bool(b)) => return Ok(*b),
                Some(v) => bail!(
                    "{}: field `add_bos_token`: expected true or false, got {v}",
                    cfg.path.display()
                ),
            }
        }
        let Some(bos) = bos else {
            return Ok(false);
        };
        let probe = |special: bool| {
            hf.encode("a", special)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        };
        let (with, without) = (probe(true), probe(false));
        Ok(with.first() == Some(&bos) && without.first() != Some(&bos))
    }

    fn chat_template(&self, dir: &Path, specials: &Specials) -> Result<Option<ChatTemplate>> {
        let Some((origin, source)) = self.find_chat_template(dir)? else {
            return Ok(None);
        };
        Ok(Some(ChatTemplate::new(origin, source, specials)))
    }

    fn find_chat_template(&self, dir: &Path) -> Result<Option<(String, String)>> {
        let jinja = dir.join(CHAT_TEMPLATE_JINJA);
        if jinja.is_file() {
            let src = std::fs::read_to_string(&jinja)
                .with_context(|| format!("reading {}", jinja.display()))?;
            return Ok(Some((jinja.display().to_string(), src)));
        }
        if let Some(cfg) = &self.tokenizer_config {
            if let Some(t) = template_field(cfg)? {
                return Ok(Some(t));
            }
        }
        if let Some(cfg) = ConfigFile::load(dir.join(CHAT_TEMPLATE_JSON))? {
            if let Some(t) = template_field(&cfg)? {
                return Ok(Some(t));
            }
        }
        Ok(None)
    }
}

/// The `chat_template` field: a string, or a list of `{name, template}` (the one named
/// "default" is used, else the first).
fn template_field(cfg: &ConfigFile) -> Result<Option<(String, String)>> {
    let origin = format!("{} (field `chat_template`)", cfg.path.display());
    match cfg.field("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some((origin, s.clone()))),
        Some(Json::Array(items)) => {
            let pick = items
                .iter()
                .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                .or_else(|| items.first());
            match pick.map(|t| t.get("template")) {
                None => Ok(None),
                Some(Some(Json::String(s))) => Ok(Some((origin, s.clone()))),
                Some(_) => bail!(
                    "{}: field `chat_template`: list entries must be objects with a string `template`",
                    cfg.path.display()
                ),
            }
        }
        Some(v) => bail!(
            "{}: field `chat_template`: expected a string or a list of {{name, template}}, got {}",
            cfg.path.display(),
            json_kind(v)
        ),
    }
}

fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

// ---------------------------------------------------------------------------------------
// Chat templates

#[derive(Clone)]
struct ChatTemplate {
    /// Where the template came from (file, and field), for errors.
    origin: String,
    /// The compiled template, or the compile error (reported when rendering, so that a
    /// broken template does not stop the tokenizer from loading).
    env: std::result::Result<minijinja::Environment<'static>, String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .field("compiled", &self.env.is_ok())
            .finish()
    }
}

const TEMPLATE_NAME: &str = "chat_template";

impl ChatTemplate {
    fn new(origin: String, source: String, specials: &Specials) -> Self {
        let mut env = minijinja::Environment::new();
        // Hugging Face renders with trim_blocks and lstrip_blocks on.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        let env = match env.add_template_owned(TEMPLATE_NAME, source) {
            Ok(()) => Ok(env),
            Err(e) => Err(e.to_string()),
        };
        Self {
            origin,
            env,
            bos_token: specials.bos_text.clone(),
            eos_token: specials.eos_text.clone(),
            pad_token: specials.pad_text.clone(),
            unk_token: specials.unk_text.clone(),
        }
    }

    fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let env = match &self.env {
            Ok(env) => env,
            Err(e) => bail!("compiling the chat template from {}: {e}", self.origin),
        };
        let tmpl = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| anyhow!("chat template from {}: {e}", self.origin))?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            pad_token => self.pad_token.clone(),
            unk_token => self.unk_token.clone(),
        };
        tmpl.render(ctx)
            .map_err(|e| anyhow!("rendering the chat template from {}: {e}", self.origin))
    }
}

fn raise_exception(msg: String) -> std::result::Result<minijinja::Value, minijinja::Error> {
    Err(minijinja::Error::new(
        minijinja::ErrorKind::InvalidOperation,
        format!("template raised an exception: {msg}"),
    ))
}

/// `strftime_now(format)` as Hugging Face provides it (Python's
/// `datetime.now().strftime(format)`; UTC here), formatted by chrono. A directive chrono
/// does not know is a template error rather than text.
fn strftime_now(format: String) -> std::result::Result<String, minijinja::Error> {
    strftime_utc(&format, chrono::Utc::now())
}

fn strftime_utc(
    format: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> std::result::Result<String, minijinja::Error> {
    use std::fmt::Write;
    let mut out = String::new();
    write!(out, "{}", at.format(format)).map_err(|_| {
        minijinja::Error::new(
            minijinja::ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format {format:?}"),
        )
    })?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// llama2.c

const LLAMA2C_UNK: u32 = 0;
const LLAMA2C_BOS: u32 = 1;
const LLAMA2C_EOS: u32 = 2;
/// Byte-fallback tokens `<0x00>`..`<0xFF>` start at this id.
const LLAMA2C_BYTE_OFFSET: u32 = 3;

#[derive(Clone)]
struct Llama2c {
    pieces: Vec<Vec<u8>>,
    scores: Vec<f32>,
    /// Piece bytes -> id (the first id when a piece appears twice).
    lookup: HashMap<Vec<u8>, u32>,
    /// For pieces spelled `<0xHH>`: the raw byte they stand for.
    byte_of: Vec<Option<u8>>,
}

impl Llama2c {
    fn parse(bytes: &[u8], vocab_size: usize) -> Result<Self> {
        if vocab_size < 3 {
            bail!("vocab size {vocab_size} is too small (ids 0, 1, 2 are <unk>, <s>, </s>)");
        }
        let mut rest = bytes;
        let mut take = |n: usize| -> Option<Vec<u8>> {
            if rest.len() < n {
                return None;
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Some(head.to_vec())
        };
        let header = take(4).with_context(|| {
            format!(
                "file is {} bytes, too short for the int32 max_token_length header",
                bytes.len()
            )
        })?;
        let max_token_length = i32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        if max_token_length < 0 {
            bail!("negative max_token_length {max_token_length} in the header");
        }
        // Each token takes at least 8 bytes: a vocab size beyond the file is caught below
        // as truncation, not by a huge allocation here.
        let cap = vocab_size.min(bytes.len() / 8);
        let mut pieces = Vec::with_capacity(cap);
        let mut scores = Vec::with_capacity(cap);
        for i in 0..vocab_size {
            let rec = take(8).with_context(|| {
                format!(
                    "truncated at token {i} of {vocab_size}: missing its score and length (file is {} bytes)",
                    bytes.len()
                )
            })?;
            let score = f32::from_le_bytes([rec[0], rec[1], rec[2], rec[3]]);
            let len = i32::from_le_bytes([rec[4], rec[5], rec[6], rec[7]]);
            if len < 0 {
                bail!("token {i}: negative piece length {len}");
            }
            let piece = take(len as usize).with_context(|| {
                format!(
                    "truncated at token {i} of {vocab_size}: its piece needs {len} bytes (file is {} bytes)",
                    bytes.len()
                )
            })?;
            pieces.push(piece);
            scores.push(score);
        }
        let mut lookup = HashMap::with_capacity(pieces.len());
        for (i, p) in pieces.iter().enumerate() {
            lookup.entry(p.clone()).or_insert(i as u32);
        }
        let byte_of = pieces.iter().map(|p| parse_byte_piece(p)).collect();
        Ok(Self {
            pieces,
            scores,
            lookup,
            byte_of,
        })
    }

    fn byte_token(&self, b: u8) -> Result<u32> {
        let id = u32::from(b) + LLAMA2C_BYTE_OFFSET;
        if id as usize >= self.pieces.len() {
            bail!(
                "byte 0x{b:02X} has no byte-fallback token (id {id} >= vocab size {})",
                self.pieces.len()
            );
        }
        Ok(id)
    }

    /// run.c's `encode(t, text, bos, eos=0, ...)`.
    fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>> {
        let mut tokens: Vec<u32> = Vec::with_capacity(text.len() + 2);
        if add_bos {
            tokens.push(LLAMA2C_BOS);
        }
        if !text.is_empty() {
            // add_dummy_prefix: the " " piece (byte fallback if a vocab lacks it).
            match self.lookup.get(b" ".as_slice()) {
                Some(&id) => tokens.push(id),
                None => tokens.push(self.byte_token(b' ')?),
            }
        }
        let mut buf = [0u8; 4];
        for c in text.chars() {
            let s = c.encode_utf8(&mut buf).as_bytes();
            match self.lookup.get(s) {
                Some(&id) => tokens.push(id),
                None => {
                    for &b in s {
                        tokens.push(self.byte_token(b)?);
                    }
                }
            }
        }
        Ok(self.merge(tokens))
    }

    /// Merge the adjacent pair whose concatenation is a piece with the highest score
    /// (leftmost on ties, and only scores above -1e10, as run.c does) until none is left.
    fn merge(&self, tokens: Vec<u32>) -> Vec<u32> {
        let n = tokens.len();
        if n < 2 {
            return tokens;
        }
        let mut tok = tokens;
        let mut next: Vec<usize> = (1..=n).collect(); // n = end
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect(); // usize::MAX = none
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        let mut concat = Vec::new();

        let candidate = |tok: &[u32], i: usize, j: usize, concat: &mut Vec<u8>| {
            concat.clear();
            concat.extend_from_slice(&self.pieces[tok[i] as usize]);
            concat.extend_from_slice(&self.pieces[tok[j] as usize]);
            let &id = self.lookup.get(concat.as_slice())?;
            let score = self.scores[id as usize];
            // run.c starts from best_score = -1e10 and needs a strictly greater score;
            // NaN never compares greater.
            (score > -1e10).then_some(Candidate {
                score,
                left: i,
                right: j,
                left_tok: tok[i],
                right_tok: tok[j],
                merged: id,
            })
        };

        for i in 0..n - 1 {
            if let Some(c) = candidate(&tok, i, i + 1, &mut concat) {
                heap.push(c);
            }
        }
        while let Some(c) = heap.pop() {
            let (i, j) = (c.left, c.right);
            if !alive[i]
                || !alive[j]
                || next[i] != j
                || tok[i] != c.left_tok
                || tok[j] != c.right_tok
            {
                continue; // stale
            }
            tok[i] = c.merged;
            alive[j] = false;
            let after = next[j];
            next[i] = after;
            if after < n {
                prev[after] = i;
                if let Some(c) = candidate(&tok, i, after, &mut concat) {
                    heap.push(c);
                }
            }
            let before = prev[i];
            if before < n {
                if let Some(c) = candidate(&tok, before, i, &mut concat) {
                    heap.push(c);
                }
            }
        }
        tok.iter()
            .zip(&alive)
            .filter_map(|(&t, &a)| a.then_some(t))
            .collect()
    }

    /// run.c's `decode` applied along the sequence, dropping BOS/EOS, lossy UTF-8.
    fn decode(&self, ids: &[u32]) -> String {
        let mut out: Vec<u8> = Vec::new();
        let mut prev: Option<u32> = None;
        for &id in ids {
            let after_bos = prev == Some(LLAMA2C_BOS);
            prev = Some(id);
            if id == LLAMA2C_BOS || id == LLAMA2C_EOS {
                continue;
            }
            let Some(piece) = self.pieces.get(id as usize) else {
                continue; // range is checked by the caller
            };
            if let Some(b) = self.byte_of[id as usize] {
                out.push(b);
                continue;
            }
            let piece = match piece.split_first() {
                Some((b' ', rest)) if after_bos => rest,
                _ => piece.as_slice(),
            };
            out.extend_from_slice(piece);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// `<0xHH>` -> the byte HH.
fn parse_byte_piece(p: &[u8]) -> Option<u8> {
    let hex = p.strip_prefix(b"<0x")?.strip_suffix(b">")?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
}

/// A mergeable adjacent pair in the priority queue: highest score first, then leftmost.
struct Candidate {
    score: f32,
    left: usize,
    right: usize,
    left_tok: u32,
    right_tok: u32,
    merged: u32,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Candidate {}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Scores are never NaN here; -0.0 and 0.0 compare equal, as in C.
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_dates() {
        let at = |secs: i64| chrono::DateTime::from_timestamp(secs, 0).unwrap();
        let f = |fmt: &str, secs: i64| strftime_utc(fmt, at(secs)).unwrap();
        // 2024-07-26 13:05:09 UTC is a Friday.
        let t = 1_722_000_000 - 1_722_000_000 % 86_400 + 13 * 3600 + 5 * 60 + 9;
        assert_eq!(f("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            f("%A %B %e, %y %H:%M:%S %j %%", t),
            "Friday July 26, 24 13:05:09 208 %"
        );
        assert_eq!(f("%Y-%m-%d %a", 0), "1970-01-01 Thu");
        assert_eq!(f("%Y-%m-%d", 951_782_400), "2000-02-29");
        // Directives the hand-written version lacked, and a refused one.
        assert_eq!(f("%I %p %u", t), "01 PM 5");
        assert!(strftime_utc("%Q", at(t)).is_err());
    }

    #[test]
    fn byte_pieces() {
        assert_eq!(parse_byte_piece(b"<0x0A>"), Some(10));
        assert_eq!(parse_byte_piece(b"<0xff>"), Some(255));
        assert_eq!(parse_byte_piece(b"<0x0>"), None);
        assert_eq!(parse_byte_piece(b"<s>"), None);
    }
}
