//! A preallocated key/value cache written in place: per layer, `slots` sequences of up to
//! `cap` positions, each position one [kv_heads, head_dim] vector stored per head so a head's
//! keys are contiguous. K/V are stored once per kv head (grouped-query attention reads them for
//! every query head of its group; nothing is repeated).
pub struct KvCache {
    layers: usize,
    slots: usize,
    kv_heads: usize,
    head_dim: usize,
    cap: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvCache {
    /// `layers` = 1 makes a scratch cache that every layer reuses (scoring: nothing is kept
    /// between layers, so one layer's worth of memory suffices).
    pub fn new(layers: usize, slots: usize, kv_heads: usize, head_dim: usize, cap: usize) -> Self {
        let n = slots * kv_heads * cap * head_dim;
        Self {
            layers,
            slots,
            kv_heads,
            head_dim,
            cap,
            k: (0..layers).map(|_| vec![0f32; n]).collect(),
            v: (0..layers).map(|_| vec![0f32; n]).collect(),
        }
    }

    pub fn cap(&self) -> usize {
        self.cap
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    fn layer(&self, l: usize) -> usize {
        if self.layers == 1 {
            0
        } else {
            l
        }
    }

    fn offset(&self, slot: usize, head: usize, pos: usize) -> usize {
        ((slot * self.kv_heads + head) * self.cap + pos) * self.head_dim
    }

    /// Writes one position's keys and values ([kv_heads · head_dim] each).
    pub fn write(&mut self, layer: usize, slot: usize, pos: usize, k: &[f32], v: &[f32]) {
        assert!(
            slot < self.slots && pos < self.cap,
            "kv cache: slot/position out of range"
        );
        let l = self.layer(layer);
        let hd = self.head_dim;
        for h in 0..self.kv_heads {
            let o = self.offset(slot, h, pos);
            self.k[l][o..o + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            self.v[l][o..o + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// Keys and values of positions 0..len of one (slot, kv head): [len, head_dim] each.
    pub fn head(&self, layer: usize, slot: usize, head: usize, len: usize) -> (&[f32], &[f32]) {
        let l = self.layer(layer);
        let o = self.offset(slot, head, 0);
        let n = len * self.head_dim;
        (&self.k[l][o..o + n], &self.v[l][o..o + n])
    }
}
