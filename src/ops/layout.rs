//! Data movement without arithmetic (`kernels/layout.cu`): pixel (un)shuffle, concat, slice,
//! batch broadcast, dtype cast, and two gathers (token embedding, one row per sample).
//!
//! Index inputs are f32 tensors holding integers (exact below 2²⁴). The references reject an
//! index that is not an integer in range, naming it; the kernels clamp it into range
//! instead, since a device kernel cannot report an error per element.

use super::{inputs_n, nhwc, require_f32, rows_launch, to_i32, Shaped};
use crate::runtime::graph::{DevTensor, LaunchIo, OpImpl, OutSpec, TensorDesc};
use crate::runtime::launch::{Args, Launch};
use crate::tensor::{numel, DType, HostTensor};
use crate::verify::{copy_tolerance, make_indices, unary_check, DTYPE_PAIRS};
use crate::verify::{seed_sequence, CheckBuilder, OpCheck, Scale};
use crate::{Error, Result};

/// The address `elems` elements of `dtype` past `ptr`.
fn offset(ptr: u64, elems: usize, dtype: DType) -> u64 {
    ptr + (elems * dtype.size()) as u64
}

/// One strided block copy (`copy_rows_*` of `kernels/layout.cu`): `rows` rows of `cols`
/// elements from `src + r·src_pitch` to `dst + r·dst_pitch` (pitches in elements).
struct RowCopy {
    src: u64,
    src_dtype: DType,
    dst: u64,
    dst_dtype: DType,
    rows: usize,
    cols: usize,
    src_pitch: usize,
    dst_pitch: usize,
}

impl RowCopy {
    /// Contiguous copies become one long row; same-dtype copies whose addresses, pitches and
    /// row length are all multiples of 16 bytes move 16-byte units.
    fn launch(&self) -> Result<Launch> {
        let contiguous = self.src_pitch == self.cols && self.dst_pitch == self.cols;
        let (rows, cols, src_pitch, dst_pitch) = if contiguous {
            let n = self.rows * self.cols;
            (1, n, n, n)
        } else {
            (self.rows, self.cols, self.src_pitch, self.dst_pitch)
        };
        let es = self.src_dtype.size();
        let x16 = self.src_dtype == self.dst_dtype
            && self.src % 16 == 0
            && self.dst % 16 == 0
            && [cols, src_pitch, dst_pitch]
                .iter()
                .all(|n| n * es % 16 == 0);
        let (name, unit) = if x16 {
            ("copy_rows_x16".to_string(), 16 / es)
        } else {
            let (i, o) = (self.src_dtype.suffix(), self.dst_dtype.suffix());
            (format!("copy_rows_{i}_{o}"), 1)
        };
        let args = Args::new()
            .ptr(self.src)
            .ptr(self.dst)
            .u64(rows as u64)
            .u64((cols / unit) as u64)
            .u64((src_pitch / unit) as u64)
            .u64((dst_pitch / unit) as u64);
        rows_launch(&name, rows, cols / unit, args)
    }
}

/// One row gather (`gather_rows_*`): output row r is source row `r·group + idx[r]`, the f32
/// index clamped into `[0, n)` by the kernel.
struct RowGather<'a> {
    idx: DevTensor<'a>,
    src: DevTensor<'a>,
    dst: DevTensor<'a>,
    rows: usize,
    cols: usize,
    n: usize,
    group: usize,
}

impl RowGather<'_> {
    fn launch(&self, op: &str) -> Result<Launch> {
        require_f32(op, "the index tensor", self.idx.desc)?;
        let (i, o) = (self.src.desc.dtype.suffix(), self.dst.desc.dtype.suffix());
        let args = Args::new()
            .ptr(self.idx.ptr)
            .ptr(self.src.ptr)
            .ptr(self.dst.ptr)
            .u64(self.rows as u64)
            .u64(self.cols as u64)
            .i32(to_i32(op, "index range", self.n)?)
            .u64(self.group as u64);
        rows_launch(&format!("gather_rows_{i}_{o}"), self.rows, self.cols, args)
    }
}

/// r ≥ 1; returns r².
fn shuffle_factor(op: &str, r: usize) -> Result<usize> {
    if r == 0 {
        return Err(Error::shape(op, "the factor r must be at least 1"));
    }
    Ok(r * r)
}

/// The two sides of a pixel shuffle by `r`: the coarse image `[B, hc, wc, C·r²]` and the fine
/// image `[B, hf, wf, C]`. The fine image may extend past `r·hc × r·wc` (a cropped unshuffle);
/// its extra rows and columns belong to no pair.
struct ShuffleGeometry {
    batch: usize,
    coarse: (usize, usize),
    fine: (usize, usize),
    channels: usize,
    r: usize,
}

impl ShuffleGeometry {
    /// Calls `f(coarse_index, fine_index)` for every element pair: coarse channel
    /// `c·r² + dy·r + dx` at `(h, w)` is fine channel `c` at `(r·h + dy, r·w + dx)`.
    fn for_each_pair(&self, mut f: impl FnMut(usize, usize)) {
        let (hc, wc) = self.coarse;
        let (hf, wf) = self.fine;
        let (r, c) = (self.r, self.channels);
        let mut coarse = 0;
        for b in 0..self.batch {
            for h in 0..hc {
                for w in 0..wc {
                    for ch in 0..c {
                        for dy in 0..r {
                            for dx in 0..r {
                                let (y, x) = (r * h + dy, r * w + dx);
                                f(coarse, ((b * hf + y) * wf + x) * c + ch);
                                coarse += 1;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The launch of `<op>_<in>_<out>` (`to_fine`: a shuffle, else an unshuffle), indexed by
    /// the output's image rows.
    fn launch(&self, op: &str, to_fine: bool, io: &LaunchIo, out: DType) -> Result<Launch> {
        let x = io.inputs[0];
        let (r, c) = (self.r, self.channels);
        let (h, w, ch) = if to_fine {
            (self.fine.0, self.fine.1, c)
        } else {
            (self.coarse.0, self.coarse.1, c * r * r)
        };
        let (rows, cols) = (self.batch * h, w * ch);
        let i = |what: &str, v: usize| to_i32(op, what, v);
        let args = Args::new()
            .ptr(x.ptr)
            .ptr(io.outputs[0].ptr)
            .i32(i("image rows", rows)?)
            .i32(i("row length", cols)?)
            .i32(i("channels", c)?)
            .i32(i("r", r)?)
            .i32(i("coarse height", self.coarse.0)?)
            .i32(i("coarse width", self.coarse.1)?)
            .i32(i("fine height", self.fine.0)?)
            .i32(i("fine width", self.fine.1)?);
        let name = format!("{op}_{}_{}", x.desc.dtype.suffix(), out.suffix());
        rows_launch(&name, rows, cols, args)
    }
}

/// `[B, H, W, C·r²] → [B, H·r, W·r, C]`, PyTorch's `PixelShuffle(r)` channel order.
#[derive(Clone, Debug, PartialEq)]
pub struct PixelShuffle {
    pub r: usize,
    pub out: DType,
}

impl PixelShuffle {
    fn geometry<T: Shaped>(&self, ins: &[&T]) -> Result<ShuffleGeometry> {
        let op = self.name();
        let [x] = inputs_n(op, ins)?;
        let [b, h, w, c] = nhwc(op, "x", x.shape())?;
        let rr = shuffle_factor(op, self.r)?;
        if c % rr != 0 {
            return Err(Error::shape(
                op,
                format!("{c} channels are not a multiple of r² = {rr}"),
            ));
        }
        Ok(ShuffleGeometry {
            batch: b,
            coarse: (h, w),
            fine: (h * self.r, w * self.r),
            channels: c / rr,
            r: self.r,
        })
    }
}

impl OpImpl for PixelShuffle {
    fn name(&self) -> &'static str {
        "pixel_shuffle"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let g = self.geometry(inputs)?;
        Ok(vec![(
            vec![g.batch, g.fine.0, g.fine.1, g.channels],
            self.out,
        )])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (x, y) = (&inputs[0].data, &mut outputs[0].data);
        self.geometry(inputs)?
            .for_each_pair(|coarse, fine| y[fine] = x[coarse]);
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let g = self.geometry(&[io.inputs[0].desc])?;
        Ok(vec![g.launch(self.name(), true, io, self.out)?])
    }
}

/// `[B, H, W, C] → [B, H/r, W/r, C·r²]`, the inverse of [`PixelShuffle`]. H and W must be
/// multiples of r unless `crop`, which floors them and drops the trailing rows and columns.
///
/// With crop, this followed by a GEMM with the weight `[Cout, Cin, r, r]` flattened to
/// `[Cout, Cin·r²]` is a k = r, stride r convolution that floors odd sizes (Stage B's 2×2
/// stride-2 downscaler): the flattened weight has exactly the unshuffled channel order.
#[derive(Clone, Debug, PartialEq)]
pub struct PixelUnshuffle {
    pub r: usize,
    pub crop: bool,
    pub out: DType,
}

impl PixelUnshuffle {
    fn geometry<T: Shaped>(&self, ins: &[&T]) -> Result<ShuffleGeometry> {
        let op = self.name();
        let [x] = inputs_n(op, ins)?;
        let [b, h, w, c] = nhwc(op, "x", x.shape())?;
        let r = self.r;
        shuffle_factor(op, r)?;
        if !self.crop && (h % r != 0 || w % r != 0) {
            return Err(Error::shape(
                op,
                format!("{h}×{w} is not a multiple of r = {r}; set crop to drop the remainder"),
            ));
        }
        if h < r || w < r {
            return Err(Error::shape(op, format!("{h}×{w} is smaller than r = {r}")));
        }
        Ok(ShuffleGeometry {
            batch: b,
            coarse: (h / r, w / r),
            fine: (h, w),
            channels: c,
            r,
        })
    }
}

impl OpImpl for PixelUnshuffle {
    fn name(&self) -> &'static str {
        "pixel_unshuffle"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let g = self.geometry(inputs)?;
        Ok(vec![(
            vec![g.batch, g.coarse.0, g.coarse.1, g.channels * g.r * g.r],
            self.out,
        )])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let (x, y) = (&inputs[0].data, &mut outputs[0].data);
        self.geometry(inputs)?
            .for_each_pair(|coarse, fine| y[coarse] = x[fine]);
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let g = self.geometry(&[io.inputs[0].desc])?;
        Ok(vec![g.launch(self.name(), false, io, self.out)?])
    }
}

/// (elements before `axis`, elements after it) of a row-major shape.
fn outer_inner(shape: &[usize], axis: usize) -> (usize, usize) {
    (numel(&shape[..axis]), numel(&shape[axis + 1..]))
}

/// Refuses an axis past the rank or an empty tensor.
fn check_axis(op: &str, shape: &[usize], axis: usize) -> Result<()> {
    if axis >= shape.len() {
        return Err(Error::shape(
            op,
            format!("axis {axis} is out of range for shape {shape:?}"),
        ));
    }
    if shape.contains(&0) {
        return Err(Error::shape(op, format!("empty input {shape:?}")));
    }
    Ok(())
}

/// Two or more inputs, equal except along `axis` (an index into the shape), joined in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Concat {
    pub axis: usize,
    pub out: DType,
}

impl Concat {
    fn out_shape<T: Shaped>(&self, ins: &[&T]) -> Result<Vec<usize>> {
        let op = self.name();
        if ins.len() < 2 {
            return Err(Error::shape(
                op,
                format!("needs at least 2 inputs, got {}", ins.len()),
            ));
        }
        let first = ins[0].shape();
        let mut out = first.to_vec();
        let mut total = 0;
        for (i, t) in ins.iter().enumerate() {
            let s = t.shape();
            check_axis(op, s, self.axis)?;
            let same_elsewhere = s.len() == first.len()
                && s.iter()
                    .zip(first)
                    .enumerate()
                    .all(|(d, (a, b))| d == self.axis || a == b);
            if !same_elsewhere {
                return Err(Error::shape(
                    op,
                    format!(
                        "input {i} {s:?} differs from input 0 {first:?} outside axis {}",
                        self.axis
                    ),
                ));
            }
            total += s[self.axis];
        }
        out[self.axis] = total;
        Ok(out)
    }
}

impl OpImpl for Concat {
    fn name(&self) -> &'static str {
        "concat"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        Ok(vec![(self.out_shape(inputs)?, self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let shape = self.out_shape(inputs)?;
        let (outer, inner) = outer_inner(&shape, self.axis);
        let y = &mut outputs[0].data;
        let mut at = 0;
        for o in 0..outer {
            for x in inputs {
                let chunk = x.shape[self.axis] * inner;
                y[at..at + chunk].copy_from_slice(&x.data[o * chunk..][..chunk]);
                at += chunk;
            }
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let descs: Vec<&TensorDesc> = io.inputs.iter().map(|t| t.desc).collect();
        let shape = self.out_shape(&descs)?;
        let y = io.outputs[0];
        let (outer, inner) = outer_inner(&shape, self.axis);
        let row = shape[self.axis] * inner;
        let mut at = 0;
        io.inputs
            .iter()
            .map(|x| {
                let cols = x.desc.shape[self.axis] * inner;
                let copy = RowCopy {
                    src: x.ptr,
                    src_dtype: x.desc.dtype,
                    dst: offset(y.ptr, at, self.out),
                    dst_dtype: self.out,
                    rows: outer,
                    cols,
                    src_pitch: cols,
                    dst_pitch: row,
                };
                at += cols;
                copy.launch()
            })
            .collect()
    }
}

/// `len` entries of `axis` from `start` on.
#[derive(Clone, Debug, PartialEq)]
pub struct Slice {
    pub axis: usize,
    pub start: usize,
    pub len: usize,
    pub out: DType,
}

impl Slice {
    fn out_shape<T: Shaped>(&self, ins: &[&T]) -> Result<Vec<usize>> {
        let op = self.name();
        let [x] = inputs_n(op, ins)?;
        let s = x.shape();
        check_axis(op, s, self.axis)?;
        let end = self.start.checked_add(self.len);
        if self.len == 0 || end.is_none_or(|e| e > s[self.axis]) {
            return Err(Error::shape(
                op,
                format!(
                    "[{}, {}+{}) is not a non-empty range of axis {} of {s:?}",
                    self.start, self.start, self.len, self.axis
                ),
            ));
        }
        let mut out = s.to_vec();
        out[self.axis] = self.len;
        Ok(out)
    }
}

impl OpImpl for Slice {
    fn name(&self) -> &'static str {
        "slice"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        Ok(vec![(self.out_shape(inputs)?, self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        self.out_shape(inputs)?;
        let x = inputs[0];
        let (_, inner) = outer_inner(&x.shape, self.axis);
        let (src, dst) = (x.shape[self.axis] * inner, self.len * inner);
        for (y, row) in outputs[0]
            .data
            .chunks_exact_mut(dst)
            .zip(x.data.chunks_exact(src))
        {
            y.copy_from_slice(&row[self.start * inner..][..dst]);
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let x = io.inputs[0];
        self.out_shape(&[x.desc])?;
        let (outer, inner) = outer_inner(&x.desc.shape, self.axis);
        let cols = self.len * inner;
        let copy = RowCopy {
            src: offset(x.ptr, self.start * inner, x.desc.dtype),
            src_dtype: x.desc.dtype,
            dst: io.outputs[0].ptr,
            dst_dtype: self.out,
            rows: outer,
            cols,
            src_pitch: x.desc.shape[self.axis] * inner,
            dst_pitch: cols,
        };
        Ok(vec![copy.launch()?])
    }
}

/// `[N, C] → [batch, N, C]`: a weight shared by every sample (e.g. the INR's wtokens).
#[derive(Clone, Debug, PartialEq)]
pub struct Broadcast {
    pub batch: usize,
    pub out: DType,
}

impl Broadcast {
    fn out_shape<T: Shaped>(&self, ins: &[&T]) -> Result<Vec<usize>> {
        let op = self.name();
        let [x] = inputs_n(op, ins)?;
        match x.shape() {
            &[n, c] if n > 0 && c > 0 && self.batch > 0 => Ok(vec![self.batch, n, c]),
            s => Err(Error::shape(
                op,
                format!(
                    "needs a non-empty [N, C] and batch ≥ 1, got {s:?} and {}",
                    self.batch
                ),
            )),
        }
    }
}

impl OpImpl for Broadcast {
    fn name(&self) -> &'static str {
        "broadcast"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        Ok(vec![(self.out_shape(inputs)?, self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        self.out_shape(inputs)?;
        let x = &inputs[0].data;
        for y in outputs[0].data.chunks_exact_mut(x.len()) {
            y.copy_from_slice(x);
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let x = io.inputs[0];
        self.out_shape(&[x.desc])?;
        let cols = x.desc.numel();
        let copy = RowCopy {
            src: x.ptr,
            src_dtype: x.desc.dtype,
            dst: io.outputs[0].ptr,
            dst_dtype: self.out,
            rows: self.batch,
            cols,
            src_pitch: 0,
            dst_pitch: cols,
        };
        Ok(vec![copy.launch()?])
    }
}

/// Stores the input in another dtype; the values are unchanged in the f32 reference.
#[derive(Clone, Debug, PartialEq)]
pub struct Cast {
    pub out: DType,
}

impl OpImpl for Cast {
    fn name(&self) -> &'static str {
        "cast"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let [x] = inputs_n(self.name(), inputs)?;
        Ok(vec![(x.shape.clone(), self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let [x] = inputs_n(self.name(), inputs)?;
        if x.shape != outputs[0].shape {
            return Err(Error::shape(
                self.name(),
                format!("output {:?} for input {:?}", outputs[0].shape, x.shape),
            ));
        }
        outputs[0].data.copy_from_slice(&x.data);
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let x = io.inputs[0];
        let n = x.desc.numel();
        let copy = RowCopy {
            src: x.ptr,
            src_dtype: x.desc.dtype,
            dst: io.outputs[0].ptr,
            dst_dtype: self.out,
            rows: 1,
            cols: n,
            src_pitch: n,
            dst_pitch: n,
        };
        Ok(vec![copy.launch()?])
    }
}

/// Reads an index stored as f32: an integer in `[0, n)`, or an error naming `what`.
fn row_index(op: &str, what: impl FnOnce() -> String, v: f32, n: usize) -> Result<usize> {
    if v >= 0.0 && v < n as f32 && v.fract() == 0.0 {
        Ok(v as usize)
    } else {
        Err(Error::InvalidArgument(format!(
            "{op}: {} = {v} is not an integer index in [0, {n})",
            what()
        )))
    }
}

/// Token embedding: `ids` f32 `[B, T]` (integer values) and `table [V, C]` → `[B, T, C]`.
/// The reference refuses an id outside `[0, V)`, naming it; the kernel will clamp it.
#[derive(Clone, Debug, PartialEq)]
pub struct Embedding {
    pub out: DType,
}

impl Embedding {
    /// (B, T, V, C).
    fn dims<T: Shaped>(&self, ins: &[&T]) -> Result<[usize; 4]> {
        let op = self.name();
        let [ids, table] = inputs_n(op, ins)?;
        match (ids.shape(), table.shape()) {
            (&[b, t], &[v, c]) if b * t * v * c > 0 => Ok([b, t, v, c]),
            (i, t) => Err(Error::shape(
                op,
                format!("needs ids [B, T] and table [V, C], non-empty; got {i:?} and {t:?}"),
            )),
        }
    }
}

impl OpImpl for Embedding {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let [b, t, _, c] = self.dims(inputs)?;
        require_f32(self.name(), "ids", inputs[0])?;
        Ok(vec![(vec![b, t, c], self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let [_, t, v, c] = self.dims(inputs)?;
        let (ids, table) = (&inputs[0].data, &inputs[1].data);
        for (i, (y, &id)) in outputs[0].data.chunks_exact_mut(c).zip(ids).enumerate() {
            let row = row_index(self.name(), || format!("ids[{}, {}]", i / t, i % t), id, v)?;
            y.copy_from_slice(&table[row * c..][..c]);
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let [b, t, v, c] = self.dims(&[io.inputs[0].desc, io.inputs[1].desc])?;
        let gather = RowGather {
            idx: io.inputs[0],
            src: io.inputs[1],
            dst: io.outputs[0],
            rows: b * t,
            cols: c,
            n: v,
            group: 0,
        };
        Ok(vec![gather.launch(self.name())?])
    }
}

/// One row per sample: `x [B, T, C]`, `idx` f32 `[B]` → `[B, C]` holding `x[b, idx[b]]`
/// (CLIP's pooled token at the first EOS). Out-of-range indices as in [`Embedding`].
#[derive(Clone, Debug, PartialEq)]
pub struct GatherRows {
    pub out: DType,
}

impl GatherRows {
    /// (B, T, C).
    fn dims<T: Shaped>(&self, ins: &[&T]) -> Result<[usize; 3]> {
        let op = self.name();
        let [x, idx] = inputs_n(op, ins)?;
        match (x.shape(), idx.shape()) {
            (&[b, t, c], &[bi]) if b == bi && b * t * c > 0 => Ok([b, t, c]),
            (s, i) => Err(Error::shape(
                op,
                format!("needs non-empty x [B, T, C] and idx [B]; got {s:?} and {i:?}"),
            )),
        }
    }
}

impl OpImpl for GatherRows {
    fn name(&self) -> &'static str {
        "gather_rows"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let [b, _, c] = self.dims(inputs)?;
        require_f32(self.name(), "idx", inputs[1])?;
        Ok(vec![(vec![b, c], self.out)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        let [_, t, c] = self.dims(inputs)?;
        let (x, idx) = (&inputs[0].data, &inputs[1].data);
        for (b, (y, &i)) in outputs[0].data.chunks_exact_mut(c).zip(idx).enumerate() {
            let row = row_index(self.name(), || format!("idx[{b}]"), i, t)?;
            y.copy_from_slice(&x[(b * t + row) * c..][..c]);
        }
        Ok(())
    }

    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        let [b, t, c] = self.dims(&[io.inputs[0].desc, io.inputs[1].desc])?;
        let gather = RowGather {
            idx: io.inputs[1],
            src: io.inputs[0],
            dst: io.outputs[0],
            rows: b,
            cols: c,
            n: t,
            group: t,
        };
        Ok(vec![gather.launch(self.name())?])
    }
}

/// A concat of random parts of the given shapes and dtypes.
fn concat_check(
    seed: u64,
    axis: usize,
    parts: &[&[usize]],
    dtypes: &[DType],
    out: DType,
) -> Result<OpCheck> {
    let mut b = CheckBuilder::new(seed);
    let ins = parts
        .iter()
        .zip(dtypes)
        .map(|(s, &d)| b.input(s, d, 4.0))
        .collect::<Result<Vec<_>>>()?;
    let y = b.graph.op1(Concat { axis, out }, &ins)?;
    let name = format!("concat axis {axis} {parts:?} {dtypes:?} -> {out:?}");
    b.finish(name, &[y], copy_tolerance(dtypes, out))
}

/// An embedding (ids `[batch, tokens]` into a `[rows, c]` table) and a GatherRows picking
/// one of the tokens of a `[batch, tokens, c]` tensor, with valid random indices.
fn gather_check(
    seed: u64,
    (batch, tokens, rows, c): (usize, usize, usize, usize),
    din: DType,
    out: DType,
) -> Result<OpCheck> {
    let mut b = CheckBuilder::new(seed);
    let ids = b.input(&[batch, tokens], DType::F32, 1.0)?;
    let table = b.input(&[rows, c], din, 4.0)?;
    let emb = b.graph.op1(Embedding { out }, &[ids, table])?;
    let x = b.input(&[batch, tokens, c], din, 4.0)?;
    let idx = b.input(&[batch], DType::F32, 1.0)?;
    let picked = b.graph.op1(GatherRows { out }, &[x, idx])?;
    let name =
        format!("embedding [{rows}, {c}] + gather_rows b{batch} t{tokens} {din:?} -> {out:?}");
    let mut check = b.finish(name, &[emb, picked], copy_tolerance(&[din], out))?;
    make_indices(&mut check, ids, rows);
    make_indices(&mut check, idx, tokens);
    Ok(check)
}

/// Checks for `verify` and the emulator tests: every kernel with every dtype pair on odd
/// shapes (crops, every axis, rows shorter than a warp, copies that take the 16-byte path and
/// ones that cannot); on a GPU also one model-sized instance of each op.
pub fn checks(seed: u64, scale: Scale) -> Result<Vec<OpCheck>> {
    let mut v = Vec::new();
    let mut next = seed_sequence(seed);
    for &(din, dout) in &DTYPE_PAIRS {
        let tol = copy_tolerance(&[din], dout);
        for (shape, r) in [
            (&[2, 5, 7, 12][..], 2),
            (&[1, 3, 4, 45], 3),
            (&[3, 1, 1, 4], 2),
        ] {
            let op = PixelShuffle { r, out: dout };
            v.push(unary_check(next(), op, shape, din, tol)?);
        }
        for (shape, r, crop) in [
            (&[2, 7, 9, 5][..], 2, true),
            (&[1, 6, 9, 4], 3, false),
            (&[1, 2, 2, 1], 2, false),
            (&[1, 37, 3, 2], 3, true),
        ] {
            let op = PixelUnshuffle { r, crop, out: dout };
            v.push(unary_check(next(), op, shape, din, tol)?);
        }
        // A middle axis, 16-byte aligned channels (x16), whole rows (contiguous).
        for (shape, axis, start, len) in [
            (&[2, 37, 7][..], 1, 5, 20),
            (&[3, 5, 64], 2, 8, 16),
            (&[1000, 7], 0, 3, 990),
        ] {
            let op = Slice {
                axis,
                start,
                len,
                out: dout,
            };
            v.push(unary_check(next(), op, shape, din, tol)?);
        }
        for shape in [&[1000, 7][..], &[37], &[1]] {
            v.push(unary_check(next(), Cast { out: dout }, shape, din, tol)?);
        }
        for (shape, batch) in [(&[7, 3][..], 3), (&[37, 64], 2)] {
            let op = Broadcast { batch, out: dout };
            v.push(unary_check(next(), op, shape, din, tol)?);
        }
        // The second part is f32, the others `din`: mixed dtypes in one concat.
        for (axis, parts) in [
            (3, &[&[2, 3, 5, 64][..], &[2, 3, 5, 32]][..]),
            (1, &[&[2, 3, 5, 4], &[2, 4, 5, 4], &[2, 1, 5, 4]]),
            (0, &[&[1, 7, 3], &[2, 7, 3]]),
            (2, &[&[1, 37, 1], &[1, 37, 2]]),
        ] {
            let dtypes: Vec<DType> = (0..parts.len())
                .map(|i| if i == 1 { DType::F32 } else { din })
                .collect();
            v.push(concat_check(next(), axis, parts, &dtypes, dout)?);
        }
        for dims in [(2, 9, 50, 37), (1, 77, 1000, 64), (3, 1, 7, 33)] {
            v.push(gather_check(next(), dims, din, dout)?);
        }
    }
    if scale == Scale::Gpu {
        let (f, h) = (DType::F32, DType::BF16);
        let (exact, rounded) = (copy_tolerance(&[h], h), copy_tolerance(&[f], h));
        let op = PixelUnshuffle {
            r: 2,
            crop: true,
            out: h,
        };
        v.push(unary_check(next(), op, &[1, 2048, 2047, 3], f, rounded)?);
        let op = PixelShuffle { r: 2, out: h };
        v.push(unary_check(next(), op, &[1, 1024, 1024, 12], h, exact)?);
        let op = Slice {
            axis: 2,
            start: 1280,
            len: 1280,
            out: h,
        };
        v.push(unary_check(next(), op, &[2, 1024, 2560], h, exact)?);
        v.push(unary_check(
            next(),
            Cast { out: h },
            &[1, 1024, 1024, 16],
            f,
            rounded,
        )?);
        let op = Broadcast { batch: 2, out: h };
        v.push(unary_check(next(), op, &[4096, 1024], h, exact)?);
        let part: &[usize] = &[2, 64, 64, 1280];
        v.push(concat_check(next(), 3, &[part, part], &[h, h], h)?);
        v.push(gather_check(next(), (2, 77, 4096, 1280), h, h)?);
    }
    // A reshape of an input is a view of its block; of a weight, a copy.
    for dtype in [DType::F32, DType::BF16] {
        let op = Reshape {
            shape: vec![3, 35, 7],
        };
        let tol = copy_tolerance(&[dtype], dtype);
        v.push(unary_check(next(), op.clone(), &[3, 5, 7, 7], dtype, tol)?);
        let mut b = CheckBuilder::new(next());
        let w = b.weight(&[3, 5, 7, 7], dtype, 4.0)?;
        let y = b.graph.op1(op.clone(), &[w])?;
        v.push(b.finish(format!("{op:?} of a weight {dtype:?}"), &[y], tol)?);
    }
    Ok(v)
}

/// The same elements under another shape (row-major order kept): e.g. NHWC maps as token
/// sequences. A view of its input's bytes where the planner can place it there (an arena
/// tensor), else a copy through [`Cast`]'s kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Reshape {
    pub shape: Vec<usize>,
}

impl OpImpl for Reshape {
    fn name(&self) -> &'static str {
        "reshape"
    }

    fn infer(&self, inputs: &[&TensorDesc]) -> Result<Vec<OutSpec>> {
        let [x] = inputs_n(self.name(), inputs)?;
        if x.numel() != self.shape.iter().product::<usize>() || x.numel() == 0 {
            return Err(Error::shape(
                self.name(),
                format!("cannot view {:?} as {:?}", x.shape, self.shape),
            ));
        }
        Ok(vec![(self.shape.clone(), x.dtype)])
    }

    fn reference(&self, inputs: &[&HostTensor], outputs: &mut [HostTensor]) -> Result<()> {
        outputs[0].data.copy_from_slice(&inputs[0].data);
        Ok(())
    }

    fn is_view(&self) -> bool {
        true
    }

    /// Nothing where the planner placed the output on the input (an arena tensor); a copy
    /// where it could not (the input is a weight).
    fn launches(&self, io: &LaunchIo) -> Result<Vec<Launch>> {
        if io.inputs[0].ptr == io.outputs[0].ptr {
            return Ok(Vec::new());
        }
        Cast {
            out: io.inputs[0].desc.dtype,
        }
        .launches(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gemm::gemm_ref;
    use crate::ops::test_support::{assert_rejected, random, run, Rejected};
    use crate::runtime::graph::Graph;
    use crate::runtime::session::SessionOptions;
    use crate::runtime::Backend;
    use std::collections::HashMap;

    fn shuffle(r: usize) -> PixelShuffle {
        PixelShuffle { r, out: DType::F32 }
    }

    fn unshuffle(r: usize, crop: bool) -> PixelUnshuffle {
        PixelUnshuffle {
            r,
            crop,
            out: DType::F32,
        }
    }

    #[test]
    fn pixel_shuffle_and_unshuffle_invert_each_other() {
        for (shape, r) in [([2, 5, 7, 12], 2), ([1, 3, 4, 45], 3), ([3, 1, 1, 4], 2)] {
            let coarse = random(&shape, 1);
            let fine = run(&shuffle(r), &[&coarse]).unwrap();
            assert_eq!(
                fine.shape,
                [shape[0], shape[1] * r, shape[2] * r, shape[3] / (r * r)]
            );
            assert_eq!(run(&unshuffle(r, false), &[&fine]).unwrap(), coarse);
            let back = run(
                &unshuffle(r, false),
                &[&coarse.clone().reshaped(&fine.shape)],
            );
            assert_eq!(
                run(&shuffle(r), &[&back.unwrap()]).unwrap(),
                coarse.reshaped(&fine.shape)
            );
        }
    }

    #[test]
    fn pixel_shuffle_uses_pytorch_channel_order() {
        let (b, h, w, c, r) = (2, 3, 5, 2, 3);
        let x = random(&[b, h, w, c * r * r], 2);
        let y = run(&shuffle(r), &[&x]).unwrap();
        for (bi, hi, wi, ci, dy, dx) in shuffle_coords(b, h, w, c, r) {
            let src = x.data[((bi * h + hi) * w + wi) * c * r * r + ci * r * r + dy * r + dx];
            let dst = y.data[((bi * h * r + r * hi + dy) * w * r + r * wi + dx) * c + ci];
            assert_eq!(src, dst);
        }
    }

    /// Every (b, h, w, c, dy, dx) of a shuffle.
    fn shuffle_coords(
        b: usize,
        h: usize,
        w: usize,
        c: usize,
        r: usize,
    ) -> impl Iterator<Item = (usize, usize, usize, usize, usize, usize)> {
        (0..b * h * w * c * r * r).map(move |i| {
            let (dx, i) = (i % r, i / r);
            let (dy, i) = (i % r, i / r);
            let (ci, i) = (i % c, i / c);
            let (wi, i) = (i % w, i / w);
            (i / h, i % h, wi, ci, dy, dx)
        })
    }

    #[test]
    fn cropped_unshuffle_then_gemm_is_a_stride_2_conv_that_floors() {
        let (b, h, w, cin, cout) = (2, 7, 9, 5, 6);
        let x = random(&[b, h, w, cin], 3);
        let wt = random(&[cout, cin, 2, 2], 4);
        let u = run(&unshuffle(2, true), &[&x]).unwrap();
        assert_eq!(u.shape, [b, 3, 4, cin * 4]);
        let mut y = vec![0f32; b * 3 * 4 * cout];
        gemm_ref(
            &u.data,
            &wt.data,
            None,
            false,
            None,
            (cout, cin * 4),
            &mut y,
        );
        let mut i = 0;
        for bi in 0..b {
            for oy in 0..3 {
                for ox in 0..4 {
                    for co in 0..cout {
                        let mut acc = 0f64;
                        for ci in 0..cin {
                            for ky in 0..2 {
                                for kx in 0..2 {
                                    let xv = x.data
                                        [((bi * h + 2 * oy + ky) * w + 2 * ox + kx) * cin + ci];
                                    let wv = wt.data[((co * cin + ci) * 2 + ky) * 2 + kx];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        assert!((y[i] as f64 - acc).abs() < 1e-5, "{} vs {acc}", y[i]);
                        i += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn concat_then_slice_round_trips_on_every_axis() {
        for axis in 0..4 {
            let mut shapes = [[2, 3, 5, 4]; 3];
            for (i, s) in shapes.iter_mut().enumerate() {
                s[axis] += i;
            }
            let parts: Vec<HostTensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| random(s, 10 + i as u64))
                .collect();
            let refs: Vec<&HostTensor> = parts.iter().collect();
            let cat = Concat {
                axis,
                out: DType::F32,
            };
            let joined = run(&cat, &refs).unwrap();
            let mut start = 0;
            for p in &parts {
                let len = p.shape[axis];
                let op = Slice {
                    axis,
                    start,
                    len,
                    out: DType::BF16,
                };
                assert_eq!(&run(&op, &[&joined]).unwrap(), p);
                start += len;
            }
            assert_eq!(start, joined.shape[axis]);
        }
    }

    #[test]
    fn broadcast_repeats_and_cast_keeps_values() {
        let x = random(&[7, 3], 5);
        let op = Broadcast {
            batch: 3,
            out: DType::F32,
        };
        let y = run(&op, &[&x]).unwrap();
        assert_eq!(y.shape, [3, 7, 3]);
        assert!(y.data.chunks_exact(21).all(|s| s == x.data.as_slice()));
        assert_eq!(run(&Cast { out: DType::BF16 }, &[&x]).unwrap(), x);
    }

    #[test]
    fn embedding_and_gather_rows_pick_rows() {
        let table = random(&[11, 6], 6);
        let ids = HostTensor::new(vec![2, 3], vec![0.0, 10.0, 4.0, 4.0, 7.0, 1.0]);
        let y = run(&Embedding { out: DType::F32 }, &[&ids, &table]).unwrap();
        assert_eq!(y.shape, [2, 3, 6]);
        for (row, &id) in y.data.chunks_exact(6).zip(&ids.data) {
            assert_eq!(row, &table.data[id as usize * 6..][..6]);
        }

        let x = random(&[3, 5, 4], 7);
        let idx = HostTensor::new(vec![3], vec![4.0, 0.0, 2.0]);
        let y = run(&GatherRows { out: DType::F32 }, &[&x, &idx]).unwrap();
        assert_eq!(y.shape, [3, 4]);
        for (b, row) in y.data.chunks_exact(4).enumerate() {
            let t = idx.data[b] as usize;
            assert_eq!(row, &x.data[(b * 5 + t) * 4..][..4]);
        }
    }

    #[test]
    fn bad_indices_are_errors_naming_them() {
        let table = random(&[11, 6], 8);
        for (bad, pos) in [(11.0, "ids[1, 0]"), (-1.0, "ids[1, 0]"), (2.5, "ids[1, 0]")] {
            let ids = HostTensor::new(vec![2, 2], vec![0.0, 1.0, bad, 3.0]);
            let err = run(&Embedding { out: DType::F32 }, &[&ids, &table]).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(pos) && msg.contains(&bad.to_string()), "{msg}");
        }
        let x = random(&[2, 5, 4], 9);
        let idx = HostTensor::new(vec![2], vec![1.0, 5.0]);
        let err = run(&GatherRows { out: DType::F32 }, &[&x, &idx]).unwrap_err();
        assert!(err.to_string().contains("idx[1] = 5"), "{err}");
    }

    #[test]
    fn invalid_shapes_and_dtypes_are_errors() {
        let f = DType::F32;
        let cases: Vec<Rejected> = vec![
            (Box::new(shuffle(2)), vec![(&[1, 2, 2, 6], f)]),
            (Box::new(shuffle(0)), vec![(&[1, 2, 2, 4], f)]),
            (Box::new(shuffle(2)), vec![(&[2, 2, 4], f)]),
            (
                Box::new(shuffle(2)),
                vec![(&[1, 2, 2, 4], f), (&[1, 2, 2, 4], f)],
            ),
            (Box::new(unshuffle(2, false)), vec![(&[1, 5, 4, 3], f)]),
            (Box::new(unshuffle(2, true)), vec![(&[1, 1, 4, 3], f)]),
            (Box::new(unshuffle(2, true)), vec![(&[1, 0, 4, 3], f)]),
            (Box::new(Concat { axis: 1, out: f }), vec![(&[1, 2, 3], f)]),
            (
                Box::new(Concat { axis: 3, out: f }),
                vec![(&[1, 2, 3], f), (&[1, 2, 3], f)],
            ),
            (
                Box::new(Concat { axis: 1, out: f }),
                vec![(&[1, 2, 3], f), (&[1, 2, 4], f)],
            ),
            (
                Box::new(Concat { axis: 0, out: f }),
                vec![(&[1, 2, 3], f), (&[1, 2], f)],
            ),
            (
                Box::new(Slice {
                    axis: 1,
                    start: 2,
                    len: 2,
                    out: f,
                }),
                vec![(&[1, 3, 3], f)],
            ),
            (
                Box::new(Slice {
                    axis: 1,
                    start: 0,
                    len: 0,
                    out: f,
                }),
                vec![(&[1, 3, 3], f)],
            ),
            (
                Box::new(Slice {
                    axis: 1,
                    start: usize::MAX,
                    len: 2,
                    out: f,
                }),
                vec![(&[1, 3, 3], f)],
            ),
            (
                Box::new(Slice {
                    axis: 3,
                    start: 0,
                    len: 1,
                    out: f,
                }),
                vec![(&[1, 3, 3], f)],
            ),
            (Box::new(Broadcast { batch: 0, out: f }), vec![(&[3, 4], f)]),
            (Box::new(Broadcast { batch: 2, out: f }), vec![(&[3], f)]),
            (Box::new(Cast { out: f }), vec![]),
            (
                Box::new(Embedding { out: f }),
                vec![(&[2, 3], DType::BF16), (&[9, 4], f)],
            ),
            (
                Box::new(Embedding { out: f }),
                vec![(&[2, 3, 1], f), (&[9, 4], f)],
            ),
            (
                Box::new(Embedding { out: f }),
                vec![(&[2, 3], f), (&[9], f)],
            ),
            (
                Box::new(GatherRows { out: f }),
                vec![(&[2, 3, 4], f), (&[3], f)],
            ),
            (
                Box::new(GatherRows { out: f }),
                vec![(&[2, 3, 4], f), (&[2], DType::BF16)],
            ),
            (Box::new(GatherRows { out: f }), vec![(&[2, 3, 4], f)]),
        ];
        assert_rejected(&cases);
    }

    #[test]
    fn embedding_and_shuffles_run_on_the_cpu_executor() {
        let mut g = Graph::new();
        let ids = g.input("ids", &[2, 9], DType::F32).unwrap();
        let table = g.weight("table", &[50, 12], DType::BF16).unwrap();
        let emb = g.op1(Embedding { out: DType::F32 }, &[ids, table]).unwrap();
        let img = g.input("img", &[1, 6, 10, 3], DType::BF16).unwrap();
        let coarse = g.op1(unshuffle(2, false), &[img]).unwrap();
        let fine = g.op1(shuffle(2), &[coarse]).unwrap();
        g.output(emb, "emb").unwrap();
        g.output(fine, "fine").unwrap();

        let table_v = random(&[50, 12], 11);
        let ids_v = HostTensor::new(vec![2, 9], (0..18).map(|i| (i * 7 % 50) as f32).collect());
        let img_v = random(&[1, 6, 10, 3], 12);
        let weights = HashMap::from([("table".to_string(), table_v.clone())]);
        let mut s = Backend::Cpu
            .session(g, &weights, SessionOptions::default())
            .unwrap();
        s.set_input(ids, &ids_v.data).unwrap();
        s.set_input(img, &img_v.data).unwrap();
        s.run().unwrap();
        let direct = run(&Embedding { out: DType::F32 }, &[&ids_v, &table_v]).unwrap();
        assert_eq!(s.read(emb).unwrap(), direct.data);
        assert_eq!(s.read(fine).unwrap(), img_v.data);
    }

    #[test]
    fn a_reshape_launches_nothing_on_an_arena_tensor_and_copies_a_weight() {
        use crate::runtime::device::dry_launches;
        let mut g = Graph::new();
        let x = g.input("x", &[2, 3, 5, 4], DType::BF16).unwrap();
        let w = g.weight("w", &[6, 10], DType::F32).unwrap();
        let reshape = |shape: &[usize]| Reshape {
            shape: shape.to_vec(),
        };
        let xv = g.op1(reshape(&[2, 15, 4]), &[x]).unwrap();
        let xvv = g.op1(reshape(&[120]), &[xv]).unwrap();
        let wv = g.op1(reshape(&[60]), &[w]).unwrap();
        g.output(xvv, "x_flat").unwrap();
        g.output(wv, "w_flat").unwrap();
        let names: Vec<&str> = dry_launches(&g)
            .unwrap()
            .iter()
            .map(|l| l.kernel.name())
            .collect();
        assert_eq!(names, ["copy_rows_x16"]);
    }
}
