//! Products y = x·Wᵀ with W stored [out, in] (PyTorch's layout, the layout the checkpoint and the
//! model already hold, so no copy or transposition is ever made).
//!
//! Each output is a dot product of an input row with a weight row. A micro-kernel computes a
//! block of up to 3 rows × 4 outputs, so each weight row is streamed once per row block and
//! each input chunk is loaded once per 4 outputs. Every (row, output) dot product is
//! accumulated in the same order whatever block it falls in, so a row's result does not depend
//! on how many other rows are in the product: a request's samples are the same alone and in a
//! batch. AVX2/FMA is used when the CPU has it (detected at run time); otherwise a portable
//! version with 8 independent lanes, which the compiler vectorises. Where the CPU has
//! AVX-512F the same kernel runs 16 lanes wide (twice the work per instruction); the lanes'
//! summation order then differs from AVX2's, so results are exact per machine, not across
//! instruction sets.
//!
//! Threads are picked by the size of the work: a product below `MIN_WORK_PER_THREAD`
//! multiply-adds per thread runs on the calling thread (a tiny model runs single-threaded).
// Index loops mirror the micro-kernel's (row, output) block shape.
#![allow(clippy::needless_range_loop)]
use rayon::prelude::*;

/// Multiply-adds worth handing to another thread (~50–100 µs of work): below this, rayon's
/// wake-up and the threads' contention for memory cost more than they gain.
pub const MIN_WORK_PER_THREAD: usize = 1 << 19;

/// Input rows per tile: a tile of x stays in L2 while all weight rows stream past it.
const ROW_TILE: usize = 48;

/// How many threads `work` multiply-adds deserve.
pub fn threads_for(work: usize) -> usize {
    (work / MIN_WORK_PER_THREAD).clamp(1, rayon::current_num_threads())
}

/// Runs `f(i)` for i in 0..n, on `threads_for(work)` threads.
pub fn parallel_for(n: usize, work: usize, f: impl Fn(usize) + Sync + Send) {
    let threads = threads_for(work).min(n.max(1));
    if threads <= 1 {
        (0..n).for_each(f);
    } else {
        // Contiguous shares, one per thread: parallelism bounded by the work, not the pool.
        let per = n.div_ceil(threads);
        (0..threads).into_par_iter().for_each(|t| {
            for i in t * per..((t + 1) * per).min(n) {
                f(i);
            }
        });
    }
}

/// A raw output pointer shared by tasks that write disjoint elements of one buffer.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// A method, so closures capture the Send/Sync wrapper rather than its raw field.
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// y [rows, out] = x [rows, inp] · w[out, inp]ᵀ (overwriting y).
pub fn matmul_nt(x: &[f32], rows: usize, inp: usize, w: &[f32], out: usize, y: &mut [f32]) {
    matmul_nt_threads(x, rows, inp, w, out, y, threads_for(rows * inp * out));
}

/// `matmul_nt` on the calling thread only: for callers inside a parallel task that hold
/// per-thread state (rayon could otherwise run another of their tasks while this one waits).
pub fn matmul_nt_serial(x: &[f32], rows: usize, inp: usize, w: &[f32], out: usize, y: &mut [f32]) {
    matmul_nt_threads(x, rows, inp, w, out, y, 1);
}

fn matmul_nt_threads(
    x: &[f32],
    rows: usize,
    inp: usize,
    w: &[f32],
    out: usize,
    y: &mut [f32],
    threads: usize,
) {
    assert_eq!(x.len(), rows * inp, "matmul_nt: x has the wrong size");
    assert_eq!(w.len(), out * inp, "matmul_nt: w has the wrong size");
    assert_eq!(y.len(), rows * out, "matmul_nt: y has the wrong size");
    if rows == 0 || out == 0 {
        return;
    }
    let yp = OutPtr(y.as_mut_ptr());
    let avx = isa();
    let run = move |r0: usize, r1: usize, o0: usize, o1: usize| {
        // Safety: tasks cover disjoint (row, output) rectangles of y.
        unsafe { block(x, inp, w, yp, out, r0, r1, o0, o1, avx) }
    };
    if threads <= 1 {
        run(0, rows, 0, out);
    } else if rows < 2 * ROW_TILE * threads {
        // Decode and small batches: split the outputs (each thread streams its share of W
        // once per row tile). Splitting 56 rows by 48-row tiles gave one thread 48 rows and
        // the other 8.
        let per = out.div_ceil(threads).next_multiple_of(4);
        (0..out.div_ceil(per))
            .into_par_iter()
            .for_each(|t| run(0, rows, t * per, ((t + 1) * per).min(out)));
    } else {
        // Prefill: many rows, equal shares of them (each thread reads all of W per tile).
        let per = rows.div_ceil(threads);
        (0..rows.div_ceil(per))
            .into_par_iter()
            .for_each(|t| run(t * per, ((t + 1) * per).min(rows), 0, out));
    }
}

/// The instruction set the engine's micro-kernels (here and in `packed`) use, detected once
/// at run time.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    /// AVX-512F: 16 lanes per FMA, twice AVX2's work per instruction.
    Avx512,
    /// AVX2 with FMA: 8 lanes.
    Avx2,
    /// Plain Rust, which the compiler vectorises.
    Portable,
}

pub(crate) fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            if is_x86_feature_detected!("avx512f") {
                Isa::Avx512
            } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                Isa::Avx2
            } else {
                Isa::Portable
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Isa::Portable
    }
}

/// y[r0..r1, o0..o1] by tiles of rows, blocks of 4 outputs and 3 rows.
///
/// Safety: x and w are sized as `matmul_nt` checks; the caller owns that rectangle of y.
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    x: &[f32],
    inp: usize,
    w: &[f32],
    y: OutPtr,
    out: usize,
    r0: usize,
    r1: usize,
    o0: usize,
    o1: usize,
    avx: Isa,
) {
    let mut rt = r0;
    while rt < r1 {
        let rt_end = (rt + ROW_TILE).min(r1);
        let mut o = o0;
        while o < o1 {
            let n_o = (o1 - o).min(4);
            let mut r = rt;
            while r < rt_end {
                let n_r = (rt_end - r).min(3);
                let mut acc = [[0f32; 4]; 3];
                micro(x, inp, w, r, n_r, o, n_o, &mut acc, avx);
                for i in 0..n_r {
                    for j in 0..n_o {
                        *y.0.add((r + i) * out + o + j) = acc[i][j];
                    }
                }
                r += n_r;
            }
            o += n_o;
        }
        rt = rt_end;
    }
}

/// Dispatches a block of n_r ≤ 3 rows × n_o ≤ 4 outputs to a monomorphised kernel.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn micro(
    x: &[f32],
    inp: usize,
    w: &[f32],
    r: usize,
    n_r: usize,
    o: usize,
    n_o: usize,
    acc: &mut [[f32; 4]; 3],
    avx: Isa,
) {
    macro_rules! go {
        ($R:literal, $O:literal) => {{
            let xs: [&[f32]; $R] = std::array::from_fn(|i| &x[(r + i) * inp..(r + i + 1) * inp]);
            let ws: [&[f32]; $O] = std::array::from_fn(|j| &w[(o + j) * inp..(o + j + 1) * inp]);
            #[cfg(target_arch = "x86_64")]
            match avx {
                // Safety: the CPU has AVX-512F (checked at run time).
                Isa::Avx512 => unsafe { avx512::dots::<$R, $O>(&xs, &ws, acc) },
                // Safety: the CPU has AVX2 and FMA (checked at run time).
                Isa::Avx2 => unsafe { avx2::dots::<$R, $O>(&xs, &ws, acc) },
                Isa::Portable => portable::dots::<$R, $O>(&xs, &ws, acc),
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = avx;
                portable::dots::<$R, $O>(&xs, &ws, acc);
            }
        }};
    }
    match (n_r, n_o) {
        (3, 4) => go!(3, 4),
        (2, 4) => go!(2, 4),
        (1, 4) => go!(1, 4),
        (3, _) => go!(3, 1),
        (2, _) => go!(2, 1),
        _ => go!(1, 1),
    }
    // Outputs past a 4-block (out % 4 ≠ 0) are done one at a time.
    if n_o > 1 && n_o < 4 {
        for j in 1..n_o {
            let mut one = [[0f32; 4]; 3];
            micro(x, inp, w, r, n_r, o + j, 1, &mut one, avx);
            for i in 0..n_r {
                acc[i][j] = one[i][0];
            }
        }
    }
}

/// Sums 8 lanes in a fixed order (the same in both kernels' callers).
#[inline(always)]
fn hsum8(l: &[f32; 8]) -> f32 {
    ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]))
}

mod portable {
    use super::hsum8;

    /// acc[i][j] = x_i · w_j with 8 lanes over k, then the tail in order.
    #[inline(always)]
    pub fn dots<const R: usize, const O: usize>(
        xs: &[&[f32]; R],
        ws: &[&[f32]; O],
        acc: &mut [[f32; 4]; 3],
    ) {
        let k = xs[0].len();
        let body = k - k % 8;
        let mut lanes = [[[0f32; 8]; O]; R];
        let mut c = 0;
        while c < body {
            for j in 0..O {
                let wv: &[f32; 8] = ws[j][c..c + 8].try_into().expect("8 lanes");
                for i in 0..R {
                    let xv: &[f32; 8] = xs[i][c..c + 8].try_into().expect("8 lanes");
                    for l in 0..8 {
                        lanes[i][j][l] += xv[l] * wv[l];
                    }
                }
            }
            c += 8;
        }
        for i in 0..R {
            for j in 0..O {
                let mut s = hsum8(&lanes[i][j]);
                for t in body..k {
                    s += xs[i][t] * ws[j][t];
                }
                acc[i][j] = s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `hsum8` of a register without a round trip through memory: lanes l and l + 4 first,
    /// then (0 + 1) + (2 + 3) of those sums, the exact order of `hsum8` (so results equal
    /// the portable kernel's summation and earlier AVX2 runs bit for bit).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub fn hsum8_reg(v: __m256) -> f32 {
        let a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        // [a1, a0, a3, a2]: b = [a0 + a1, _, a2 + a3, _].
        let b = _mm_add_ps(a, _mm_shuffle_ps::<0b10_11_00_01>(a, a));
        _mm_cvtss_f32(_mm_add_ss(b, _mm_movehl_ps(b, b)))
    }

    /// acc[i][j] = x_i · w_j with one FMA register per (i, j), then the tail in order.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dots<const R: usize, const O: usize>(
        xs: &[&[f32]; R],
        ws: &[&[f32]; O],
        acc: &mut [[f32; 4]; 3],
    ) {
        let k = xs[0].len();
        let body = k - k % 8;
        let mut a = [[_mm256_setzero_ps(); O]; R];
        let xp: [*const f32; R] = std::array::from_fn(|i| xs[i].as_ptr());
        let wp: [*const f32; O] = std::array::from_fn(|j| ws[j].as_ptr());
        let mut c = 0;
        while c < body {
            let wv: [__m256; O] = std::array::from_fn(|j| _mm256_loadu_ps(wp[j].add(c)));
            for i in 0..R {
                let xv = _mm256_loadu_ps(xp[i].add(c));
                for j in 0..O {
                    a[i][j] = _mm256_fmadd_ps(xv, wv[j], a[i][j]);
                }
            }
            c += 8;
        }
        for i in 0..R {
            for j in 0..O {
                let mut s = hsum8_reg(a[i][j]);
                for t in body..k {
                    s += xs[i][t] * ws[j][t];
                }
                acc[i][j] = s;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// acc[i][j] = x_i · w_j with one 16-lane FMA register per (i, j); the lanes are summed
    /// in a fixed tree order, then the tail in order.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dots<const R: usize, const O: usize>(
        xs: &[&[f32]; R],
        ws: &[&[f32]; O],
        acc: &mut [[f32; 4]; 3],
    ) {
        let k = xs[0].len();
        let body = k - k % 16;
        let mut a = [[_mm512_setzero_ps(); O]; R];
        let xp: [*const f32; R] = std::array::from_fn(|i| xs[i].as_ptr());
        let wp: [*const f32; O] = std::array::from_fn(|j| ws[j].as_ptr());
        let mut c = 0;
        while c < body {
            let wv: [__m512; O] = std::array::from_fn(|j| _mm512_loadu_ps(wp[j].add(c)));
            for i in 0..R {
                let xv = _mm512_loadu_ps(xp[i].add(c));
                for j in 0..O {
                    a[i][j] = _mm512_fmadd_ps(xv, wv[j], a[i][j]);
                }
            }
            c += 16;
        }
        for i in 0..R {
            for j in 0..O {
                // In-register tree (halves, then quarters, ...): the same fixed order for
                // every accumulator, without a round trip through memory and 15 scalar adds
                // (which cost as much as the FMAs themselves at k = 512).
                let mut s = _mm512_reduce_add_ps(a[i][j]);
                for t in body..k {
                    s += xs[i][t] * ws[j][t];
                }
                acc[i][j] = s;
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn naive(x: &[f32], rows: usize, inp: usize, w: &[f32], out: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                y[r * out + o] = (0..inp)
                    .map(|k| x[r * inp + k] as f64 * w[o * inp + k] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    /// Deterministic values in [-1, 1) for kernel tests.
    pub(crate) fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_register_sum_is_hsum8_bit_for_bit() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        for seed in 0..200u32 {
            let l: [f32; 8] = std::array::from_fn(|i| {
                let v = data(8, seed)[i];
                v * 10f32.powi((i as i32 * 7 + seed as i32) % 9 - 4)
            });
            // Safety: AVX2 checked above.
            let got = unsafe { avx2::hsum8_reg(std::arch::x86_64::_mm256_loadu_ps(l.as_ptr())) };
            assert_eq!(got.to_bits(), hsum8(&l).to_bits(), "{l:?}");
        }
    }

    #[test]
    fn matches_naive_and_is_row_invariant() {
        // The last two are threaded (when the pool has two threads): 56 rows split by outputs,
        // 200 rows by equal shares of rows.
        for &(rows, inp, out) in &[
            (1, 3, 1),
            (5, 19, 7),
            (8, 64, 33),
            (130, 72, 150),
            (56, 512, 41),
            (200, 256, 44),
        ] {
            let x = data(rows * inp, 1);
            let w = data(out * inp, 2);
            let mut y = vec![0f32; rows * out];
            matmul_nt(&x, rows, inp, &w, out, &mut y);
            let want = naive(&x, rows, inp, &w, out);
            for (a, b) in y.iter().zip(&want) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
            // Each row alone gives bit-identical results.
            for r in 0..rows {
                let mut one = vec![0f32; out];
                matmul_nt(&x[r * inp..(r + 1) * inp], 1, inp, &w, out, &mut one);
                assert_eq!(one, y[r * out..(r + 1) * out]);
            }
        }
    }
}
