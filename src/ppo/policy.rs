//! The policy's side of PPO: a value head on its hidden states, and one forward pass giving
//! response-aligned log-probs and values.
use super::loss::{entropy_from_logits, response_logps, scalar};
use crate::model::Llama;
use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// A value head on the policy: V(h) = w·h + b on the final-norm hidden state, one scalar per
/// position, as TRL's `ValueHead` (`v_head.summary`, a `Linear(hidden, 1)` with bias) on
/// `AutoModelForCausalLMWithValueHead`. It shares the policy's backbone, so with LoRA the
/// value loss also trains the adapters (TRL's current PPO uses a separate value model
/// initialised from the reward model instead; a shared backbone costs no second model).
/// TRL's dropout on the head input is omitted. Initialisation is PyTorch's `nn.Linear`
/// default, U(±1/√d) for weight and bias, from a seeded stream.
#[derive(Clone)]
pub struct ValueHead {
    pub weight: Tensor,
    pub bias: Tensor,
    vars: Vec<(String, Var)>,
}

impl ValueHead {
    pub const WEIGHT: &'static str = "v_head.summary.weight";
    pub const BIAS: &'static str = "v_head.summary.bias";

    /// A fresh, trainable head for hidden size `d`.
    pub fn new(d: usize, seed: u64, device: &Device) -> Result<Self> {
        ensure!(d > 0, "value head: hidden size 0");
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bound = 1.0 / (d as f32).sqrt();
        let w = crate::model::init::uniform_vec(&mut rng, d, bound);
        let b = crate::model::init::uniform_vec(&mut rng, 1, bound);
        Self::from_tensors(
            Tensor::from_vec(w, (1, d), device)?,
            Tensor::from_vec(b, 1, device)?,
            true,
        )
    }

    /// A head from saved tensors (weight [1, d], bias [1]); `trainable` wraps them in `Var`s.
    pub fn from_tensors(weight: Tensor, bias: Tensor, trainable: bool) -> Result<Self> {
        ensure!(
            weight.rank() == 2 && weight.dim(0)? == 1,
            "value head: `{}` must have shape [1, d], got {:?}",
            Self::WEIGHT,
            weight.dims()
        );
        ensure!(
            bias.dims() == [1],
            "value head: `{}` must have shape [1], got {:?}",
            Self::BIAS,
            bias.dims()
        );
        let (weight, bias) = (weight.to_dtype(DType::F32)?, bias.to_dtype(DType::F32)?);
        if !trainable {
            return Ok(Self {
                weight,
                bias,
                vars: vec![],
            });
        }
        let (wv, bv) = (Var::from_tensor(&weight)?, Var::from_tensor(&bias)?);
        Ok(Self {
            weight: wv.as_tensor().clone(),
            bias: bv.as_tensor().clone(),
            vars: vec![(Self::WEIGHT.into(), wv), (Self::BIAS.into(), bv)],
        })
    }

    /// The trainable variables under TRL's names (empty for a frozen head).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Values [b, t] for hidden states [b, t, d].
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let d = self.weight.dim(1)?;
        let (b, t, hd) = hidden.dims3()?;
        ensure!(
            hd == d,
            "value head of width {d} applied to hidden states of width {hd}"
        );
        let v = hidden
            .reshape((b * t, d))?
            .matmul(&self.weight.t()?)?
            .broadcast_add(&self.bias)?;
        Ok(v.reshape((b, t))?)
    }

    /// The head's tensors under TRL's names, for saving.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        vec![
            (Self::WEIGHT.into(), self.weight.detach()),
            (Self::BIAS.into(), self.bias.detach()),
        ]
    }
}

/// What one forward pass of the policy gives PPO, response-aligned at a rollout's width.
pub struct PolicyOutputs {
    /// log π of each response token at the sampling temperature, [b, width] (0 on padding).
    pub logprobs: Tensor,
    /// The value head's output at the position predicting each response token, and at
    /// column `len` (the first padding slot, read at the last response token: TRL's value
    /// mask is one slot wider), [b, width] (0 beyond); None without a head.
    pub values: Option<Tensor>,
    /// Mean entropy of the temperature-scaled next-token distribution over response tokens
    /// (`policy/entropy_avg`; TRL averages over padding positions too).
    pub entropy_mean: f64,
}

/// Runs `model` on prompt ++ response and returns, for response token t of row i (t < width),
/// its log-probability at `temperature` and the value head's output, read at position
/// `prompt_i + t − 1`, the one whose logits predict it. Differentiable through the model and
/// the head; use a snapshot (and no head) for πref and for the rollout's old log-probs.
pub fn policy_forward(
    model: &Llama,
    head: Option<&ValueHead>,
    prompts: &[&[u32]],
    responses: &[&[u32]],
    width: usize,
    temperature: f64,
) -> Result<PolicyOutputs> {
    let b = prompts.len();
    ensure!(b > 0, "no sequences");
    ensure!(
        responses.len() == b,
        "{b} prompts but {} responses",
        responses.len()
    );
    let mut seqs = Vec::with_capacity(b);
    for (i, (p, r)) in prompts.iter().zip(responses).enumerate() {
        ensure!(
            !p.is_empty(),
            "row {i}: empty prompt (it needs at least BOS)"
        );
        ensure!(
            !r.is_empty() && r.len() <= width,
            "row {i}: response of {} tokens for a width of {width}",
            r.len()
        );
        seqs.push([*p, *r].concat());
    }
    let device = model.device();
    let batch = crate::model::TokenBatch::right_padded(&seqs, device)?;
    let h = model.forward_hidden(&batch.ids, &batch.positions, &batch.bias, None)?;
    let (_, len, d) = h.dims3()?;
    let mut rows = Vec::with_capacity(b * width);
    let mut tokens = Vec::with_capacity(b * width);
    let mut mask = Vec::with_capacity(b * width);
    let mut vrows = Vec::with_capacity(b * width);
    let mut vmask = Vec::with_capacity(b * width);
    for i in 0..b {
        let (p, r) = (prompts[i].len(), responses[i]);
        for t in 0..width {
            let real = t < r.len();
            // Padding columns read the last real position: finite, and masked below.
            let pos = p - 1 + t.min(r.len() - 1);
            rows.push((i * len + pos) as u32);
            tokens.push(if real { r[t] } else { 0 });
            mask.push(if real { 1f32 } else { 0.0 });
            vrows.push((i * len + p - 1 + t.min(r.len())) as u32);
            vmask.push(if t <= r.len() { 1f32 } else { 0.0 });
        }
    }
    let idx = Tensor::from_vec(rows, b * width, device)?;
    let hs = h.reshape((b * len, d))?.index_select(&idx, 0)?;
    let logits = model.logits(&hs)?.reshape((b, width, ()))?;
    let tokens = Tensor::from_vec(tokens, (b, width), device)?;
    let mask = Tensor::from_vec(mask, (b, width), device)?;
    let logprobs = (response_logps(&logits, &tokens, temperature)? * &mask)?;
    let entropy = entropy_from_logits(&(&logits / (temperature + 1e-7))?)?;
    let n_real: usize = responses.iter().map(|r| r.len()).sum();
    let entropy_mean = scalar(&(entropy * &mask)?.sum_all()?)? / n_real as f64;
    let values = match head {
        Some(hd) => {
            let vidx = Tensor::from_vec(vrows, b * width, device)?;
            let vh = h.reshape((b * len, d))?.index_select(&vidx, 0)?;
            let vmask = Tensor::from_vec(vmask, (b, width), device)?;
            Some((hd.forward(&vh.reshape((b, width, d))?)? * vmask)?)
        }
        None => None,
    };
    Ok(PolicyOutputs {
        logprobs,
        values,
        entropy_mean,
    })
}

/// A [b, width] tensor as rows (what [`Rollout`] takes).
pub fn to_rows(t: &Tensor) -> Result<Vec<Vec<f32>>> {
    Ok(t.detach().to_dtype(DType::F32)?.to_vec2::<f32>()?)
}
