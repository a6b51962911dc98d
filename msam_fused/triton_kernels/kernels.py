"""The Triton kernels: one program per segment of one tensor of a bucket, reached through a table.

A launch covers many tensors of a bucket. The host builds an int64 table (``layout.py``):
``table[2*pid]`` is the offset of the record of the tensor that program ``pid`` works on and
``table[2*pid + 1]`` the index of its segment of ``CHUNK`` elements; a record is
``[numel, first partial-sum row, address of operand 0, address of operand 1, ...]``. A
program walks its segment in rows of ``ROW`` elements: whole blocks of ``UNROLL`` rows with
unmasked loads (vector loads where the launch's records are 16-byte aligned), then the rest row
by row with masks.

Each step is two passes (docs/design.md): a read-only pass (``*_partials_kernel``) writes per
segment the sum of squares of the new ascent direction and a non-finite marker of the gradient
into its own row of a float64 ``[segments, 2]`` tensor; the write pass (``*_step_kernel``)
removes the old perturbation, updates state and weights and applies the new one.

Sums of squares are deterministic and do not depend on the tuning (``UNROLL``, ``num_warps``):
element ``i`` of a segment is added to lane ``i % ROW`` in order, the lanes are combined by a
fixed pairwise tree (every addition adds exactly two values, so the thread layout cannot
change the result), and ``sum_segment_partials_kernel`` folds the rows the same way. No float
atomics anywhere.

Arithmetic runs in the compute dtype ``CD`` (float32, or float64 for float64 tensors) and each
result is rounded to its storage dtype once, where it is written, as in ``reference.py``.
Hyper-parameters are read from the float64 ``hyper`` vector in device memory; derived scalars
(the AdamW bias corrections, ``1 - beta``, the decay) are formed in float64 once per program and
cast once. Divisions and square roots are IEEE round-to-nearest (``_div_rn``/``_sqrt_rn``), as
in the C++ kernels; the compiled float32 ``/`` and ``tl.sqrt`` would be approximate.
"""

import triton
import triton.language as tl

# Triton kernels may read module globals only when they are constexpr.
ROW = tl.constexpr(1024)
LOG2_ROW = tl.constexpr(10)
CHUNK = tl.constexpr(32 * 1024)  # elements per segment; fixed so partial sums ignore tuning
EPS_NORM = tl.constexpr(1e-12)   # reference.EPS_NORM

# Arguments whose values change from call to call: not specialised on (that would recompile
# whenever one became divisible by 16).
_UNSPECIALISED = ["n_rows"]


def _jit(fn):
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in names if n in _UNSPECIALISED])


def _device_fn(fn):
    """``triton.jit`` for helpers called from kernels.

    Under the interpreter a helper is called as its rewritten Python function: the
    interpreter's own call path re-patches ``triton.language`` on every call (milliseconds
    each), which made the interpreted tests several times slower. The kernel that calls the
    helper has already patched it (same module, same ``tl``).
    """
    helper = triton.jit(fn)
    if isinstance(helper, triton.runtime.JITFunction) or not hasattr(helper, "rewrite"):
        return helper
    rewritten = None

    def call(*args, **kwargs):
        nonlocal rewritten
        rewritten = rewritten or helper.rewrite()
        return rewritten(*args, **kwargs)
    return call


# --------------------------------------------------------------------------------- helpers
@_device_fn
def _hyper(hyper, index, CD: tl.constexpr):
    """Entry ``index`` of the float64 hyper-parameter vector, cast once to ``CD``."""
    return tl.load(hyper + index).to(CD)


@_device_fn
def _flag_clear(found_inf, HAS_FOUND_INF: tl.constexpr):
    """True when the step goes ahead: no ``found_inf`` tensor, or it holds zero."""
    if HAS_FOUND_INF:
        return tl.load(found_inf) == 0
    else:
        return tl.full((), 1, tl.int1)


@_device_fn
def _grad_scale(grad_scale, CD: tl.constexpr, HAS_SCALE: tl.constexpr):
    if HAS_SCALE:
        return tl.load(grad_scale).to(CD)
    else:
        return tl.full((), 1, CD)


@_device_fn
def _coefficient(coef, CD: tl.constexpr, USED: tl.constexpr):
    if USED:
        return tl.load(coef).to(CD)
    else:
        return tl.zeros((), CD)


@_device_fn
def _locate(table):
    """The record of this program's tensor, its segment index and the element range [lo, hi)."""
    pid = tl.program_id(0).to(tl.int64)
    rec = table + tl.load(table + 2 * pid)
    segment = tl.load(table + 2 * pid + 1)
    lo = segment * CHUNK
    hi = tl.minimum(lo + CHUNK, tl.load(rec))
    return rec, segment, lo, hi


@_device_fn
def _address(rec, operand, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(rec + 2 + operand).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address of this launch's records is 16-byte aligned: vector loads
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@_device_fn
def _load(ptr, mask):
    if mask is None:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0)


@_device_fn
def _rounded(value, DTYPE: tl.constexpr):
    """``value`` rounded to nearest (ties to even) in ``DTYPE``.

    float32 to bfloat16 is done by hand: Triton's interpreter truncates in that conversion,
    and the tests run the interpreter; the integer trick rounds alike everywhere.
    """
    if DTYPE == tl.bfloat16 and value.dtype == tl.float32:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        bits = tl.where(value != value, 0x7FC0, bits)  # NaN stays NaN
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return value.to(DTYPE)


@_device_fn
def _both(mask, write):
    """``mask & write`` for a block mask and a scalar flag (the interpreter rejects ``&``
    between a loaded flag and a block)."""
    return tl.where(write, mask, False)


@_device_fn
def _store(ptr, value, mask, write):
    """Store ``value`` rounded to the pointer's dtype where ``mask`` (if any) and ``write``."""
    value = _rounded(value, ptr.dtype.element_ty)
    if mask is None:
        tl.store(ptr, value, mask=write)
    else:
        tl.store(ptr, value, mask=_both(mask, write))


@_device_fn
def _pairwise_sum(x, N: tl.constexpr, LOG2_N: tl.constexpr):
    """The sum of the ``N`` lanes of ``x`` as a 1-element tensor, by a fixed tree in which
    every addition adds exactly two values (so no thread layout can change the result)."""
    for level in tl.static_range(LOG2_N):
        left, right = tl.split(tl.reshape(x, [N >> (level + 1), 2]))
        x = left + right
    return x


@_device_fn
def _div_rn(x, y):
    """IEEE division rounded to nearest (``/`` compiles to an approximate one in float32;
    float64 ``/`` is already IEEE and ``tl.div_rn`` takes float32 only)."""
    if x.dtype == tl.float64:
        return x / y
    else:
        return tl.div_rn(x, y)


@_device_fn
def _sqrt_rn(x):
    """IEEE square root rounded to nearest (``tl.sqrt`` is approximate in float32)."""
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@_device_fn
def _nonfinite(g):
    """1 where ``g`` is inf or NaN, else 0 (int32)."""
    return ((g != g) | (tl.abs(g) == float("inf"))).to(tl.int32)


@_device_fn
def _log1p(x):
    """``log(1 + x)`` in float64 to a few ulps, from ``log`` alone (Kahan's trick)."""
    u = 1 + x
    exact = u == 1
    return tl.where(exact, x, tl.log(u) * _div_rn(x, tl.where(exact, 1.0, u - 1)))


@_device_fn
def _expm1(y):
    """``exp(y) - 1`` in float64 to a few ulps, from ``exp`` and ``log`` (Kahan's trick)."""
    u = tl.exp(y)
    exact = (u == 1) | (u == 0)
    log_u = tl.log(tl.where(exact, 2.0, u))
    return tl.where(u == 1, y, tl.where(u == 0, -1.0, (u - 1) * _div_rn(y, log_u)))


@_device_fn
def _walk(ROW_FN: tl.constexpr, ptrs, values, FLAGS: tl.constexpr, lo, hi, UNROLL: tl.constexpr):
    """Apply ``ROW_FN`` to the rows of [lo, hi)."""
    BLOCK: tl.constexpr = UNROLL * ROW
    lanes = tl.arange(0, ROW)
    full_end = lo + (hi - lo) // BLOCK * BLOCK
    for base in range(lo, full_end, BLOCK):
        for r in tl.static_range(UNROLL):
            ROW_FN(ptrs, base + r * ROW + lanes, None, values, FLAGS)
    for base in range(full_end, hi, ROW):
        offs = base + lanes
        ROW_FN(ptrs, offs, offs < hi, values, FLAGS)


@_device_fn
def _walk_partials(ROW_FN: tl.constexpr, ptrs, values, FLAGS: tl.constexpr, lo, hi,
                   UNROLL: tl.constexpr, ACC: tl.constexpr):
    """Apply ``ROW_FN`` (returning a row of terms and a row of non-finite flags) to the rows
    of [lo, hi); return the sum of the squared terms (in ``ACC``) and whether any flag is set."""
    BLOCK: tl.constexpr = UNROLL * ROW
    lanes = tl.arange(0, ROW)
    full_end = lo + (hi - lo) // BLOCK * BLOCK
    acc = tl.zeros([ROW], ACC)
    bad = tl.zeros([ROW], tl.int32)
    for base in range(lo, full_end, BLOCK):
        for r in tl.static_range(UNROLL):
            x, flags = ROW_FN(ptrs, base + r * ROW + lanes, None, values, FLAGS)
            x = x.to(ACC)
            acc += x * x
            bad = tl.maximum(bad, flags)
    for base in range(full_end, hi, ROW):
        offs = base + lanes
        x, flags = ROW_FN(ptrs, offs, offs < hi, values, FLAGS)
        x = x.to(ACC)
        acc += x * x
        bad = tl.maximum(bad, flags)
    return _pairwise_sum(acc, ROW, LOG2_ROW), tl.max(bad, 0)


@_device_fn
def _store_partials(partials, rec, segment, total, bad):
    """Row ``first row + segment`` of the float64 partials: ``[sum of squares, marker]``, the
    marker NaN when the segment's gradient holds inf or NaN."""
    out = partials + 2 * (tl.load(rec + 1) + segment)
    tl.store(out + tl.arange(0, 1), total.to(tl.float64))
    tl.store(out + 1, tl.where(bad > 0, float("nan"), 0.0).to(tl.float64))


# --------------------------------------------------------------------------- row functions
@_device_fn
def _gradient(ptr, mask, grad_scale, CD: tl.constexpr, HAS_SCALE: tl.constexpr):
    """The gradient as stored (in the compute dtype) and divided by GradScaler's scale."""
    g = _load(ptr, mask).to(CD)
    if HAS_SCALE:
        return g, _div_rn(g, grad_scale)
    else:
        return g, g


@_device_fn
def _momentum(p, g, v, weight_decay, momentum):
    """MSAM-SGD's new momentum ``momentum * v + (g + weight_decay * p)``."""
    return momentum * v + (g + weight_decay * p)


@_device_fn
def _first_moment(m, g, beta1, one_minus_beta1):
    return beta1 * m + one_minus_beta1 * g


@_device_fn
def _msam_sgd_direction_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """The new momentum of one row (the old one without a gradient) and the gradient's
    non-finite flags."""
    p_ptr, grad_ptr, v_ptr = ptrs
    weight_decay, momentum, grad_scale = values
    HAS_GRAD: tl.constexpr = FLAGS[0]
    HAS_SCALE: tl.constexpr = FLAGS[1]
    CD: tl.constexpr = momentum.dtype
    v = _load(v_ptr + offs, mask).to(CD)
    if HAS_GRAD:
        stored, g = _gradient(grad_ptr + offs, mask, grad_scale, CD, HAS_SCALE)
        p = _load(p_ptr + offs, mask).to(CD)
        return _momentum(p, g, v, weight_decay, momentum), _nonfinite(stored)
    else:
        return v, tl.zeros([ROW], tl.int32)


@_device_fn
def _adamw_msam_direction_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """The new first moment of one row (the old one without a gradient) and the gradient's
    non-finite flags."""
    m_ptr, grad_ptr = ptrs
    beta1, one_minus_beta1, grad_scale = values
    HAS_GRAD: tl.constexpr = FLAGS[0]
    HAS_SCALE: tl.constexpr = FLAGS[1]
    CD: tl.constexpr = beta1.dtype
    m = _load(m_ptr + offs, mask).to(CD)
    if HAS_GRAD:
        stored, g = _gradient(grad_ptr + offs, mask, grad_scale, CD, HAS_SCALE)
        return _first_moment(m, g, beta1, one_minus_beta1), _nonfinite(stored)
    else:
        return m, tl.zeros([ROW], tl.int32)


@_device_fn
def _ascent_term_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """SAM's ascent direction before normalisation (``g``, or ``|p| * g`` when ADAPTIVE) and
    the gradient's non-finite flags."""
    p_ptr, grad_ptr = ptrs
    (probe,) = values
    ADAPTIVE: tl.constexpr = FLAGS[0]
    CD: tl.constexpr = probe.dtype
    g = _load(grad_ptr + offs, mask).to(CD)
    flags = _nonfinite(g)
    if ADAPTIVE:
        g = tl.abs(_load(p_ptr + offs, mask).to(CD)) * g
    return g, flags


@_device_fn
def _write_weights(p_ptr, master_ptr, offs, mask, w, x, coef_new, write, HAS_MASTER: tl.constexpr):
    """``p = w - coef_new * x``; the master copy, if any, keeps ``w``."""
    if HAS_MASTER:
        _store(master_ptr + offs, w, mask, write)
    _store(p_ptr + offs, w - coef_new * x, mask, write)


@_device_fn
def _msam_sgd_step_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """MSAM-SGD's write pass for one row (the docstring of ``reference.msam_sgd_step_``)."""
    p_ptr, grad_ptr, v_ptr, master_ptr = ptrs
    lr, weight_decay, momentum, coef_old, coef_new, grad_scale, write = values
    HAS_GRAD: tl.constexpr = FLAGS[0]
    HAS_MASTER: tl.constexpr = FLAGS[1]
    HAS_SCALE: tl.constexpr = FLAGS[2]
    CD: tl.constexpr = coef_old.dtype
    p = _load(p_ptr + offs, mask).to(CD)
    v = _load(v_ptr + offs, mask).to(CD)
    if HAS_MASTER:
        w = _load(master_ptr + offs, mask).to(CD)
    else:
        w = p + coef_old * v
    if HAS_GRAD:
        _, g = _gradient(grad_ptr + offs, mask, grad_scale, CD, HAS_SCALE)
        v = _momentum(p, g, v, weight_decay, momentum)
        w = w - lr * v
        _store(v_ptr + offs, v, mask, write)
    _write_weights(p_ptr, master_ptr, offs, mask, w, v, coef_new, write, HAS_MASTER)


@_device_fn
def _adamw_msam_step_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """AdamW-MSAM's write pass for one row (the docstring of ``reference.adamw_msam_step_``)."""
    p_ptr, grad_ptr, m_ptr, s_ptr, master_ptr = ptrs
    (beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt,
     coef_old, coef_new, grad_scale, write) = values
    HAS_GRAD: tl.constexpr = FLAGS[0]
    HAS_MASTER: tl.constexpr = FLAGS[1]
    HAS_SCALE: tl.constexpr = FLAGS[2]
    CD: tl.constexpr = coef_old.dtype
    m = _load(m_ptr + offs, mask).to(CD)
    if HAS_MASTER:
        w = _load(master_ptr + offs, mask).to(CD)
    else:
        w = _load(p_ptr + offs, mask).to(CD) + coef_old * m
    if HAS_GRAD:
        _, g = _gradient(grad_ptr + offs, mask, grad_scale, CD, HAS_SCALE)
        s = _load(s_ptr + offs, mask).to(CD)
        m = _first_moment(m, g, beta1, one_minus_beta1)
        s = beta2 * s + one_minus_beta2 * g * g
        w = w - _div_rn(step_size * m, _div_rn(_sqrt_rn(s), bias2_sqrt) + eps)
        w = w * decay
        _store(m_ptr + offs, m, mask, write)
        _store(s_ptr + offs, s, mask, write)
    _write_weights(p_ptr, master_ptr, offs, mask, w, m, coef_new, write, HAS_MASTER)


@_device_fn
def _stash_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """MSAM-SGD's new momentum for one row, written to the momentum while the old one goes
    into the consumed gradient's memory; returns it and the gradient's non-finite flags."""
    p_ptr, grad_ptr, v_ptr = ptrs
    weight_decay, momentum, grad_scale = values
    HAS_SCALE: tl.constexpr = FLAGS[0]
    CD: tl.constexpr = momentum.dtype
    v = _load(v_ptr + offs, mask).to(CD)
    stored, g = _gradient(grad_ptr + offs, mask, grad_scale, CD, HAS_SCALE)
    v_new = _momentum(_load(p_ptr + offs, mask).to(CD), g, v, weight_decay, momentum)
    always = tl.full((), 1, tl.int1)
    _store(grad_ptr + offs, v, mask, always)
    _store(v_ptr + offs, v_new, mask, always)
    return v_new, _nonfinite(stored)


@_device_fn
def _finish_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """The rest of an MSAM-SGD step after the stash for one row (the docstring of
    ``reference.msam_sgd_overlap_finish_``); a skipped step puts the old momentum back."""
    p_ptr, stash_ptr, v_ptr = ptrs
    lr, coef_old, coef_new, write = values
    HAS_STASH: tl.constexpr = FLAGS[0]
    HAS_FOUND_INF: tl.constexpr = FLAGS[1]
    CD: tl.constexpr = coef_old.dtype
    v = _load(v_ptr + offs, mask).to(CD)
    p = _load(p_ptr + offs, mask).to(CD)
    if HAS_STASH:
        v_old = _load(stash_ptr + offs, mask).to(CD)
        w = p + coef_old * v_old - lr * v
        if HAS_FOUND_INF:
            _store(v_ptr + offs, v_old, mask, write == 0)
    else:
        w = p + coef_old * v
    _store(p_ptr + offs, w - coef_new * v, mask, write)


@_device_fn
def _move_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """``p = source + SIGN * coef * direction`` (times ``source**2`` when ADAPTIVE).

    ``source`` is ``p`` itself, or another tensor (master weights, SAM's parameters when the
    ascent goes to a spare buffer) when FROM_SOURCE; ``SIGN = 0`` is a plain copy. A skipped
    step (``write`` false) leaves ``p`` alone, or, FROM_SOURCE, copies ``source`` into it.
    """
    p_ptr, direction_ptr, source_ptr = ptrs
    coef, write = values
    FROM_SOURCE: tl.constexpr = FLAGS[0]
    SIGN: tl.constexpr = FLAGS[1]
    ADAPTIVE: tl.constexpr = FLAGS[2]
    CD: tl.constexpr = coef.dtype
    if FROM_SOURCE:
        x = _load(source_ptr + offs, mask).to(CD)
    else:
        x = _load(p_ptr + offs, mask).to(CD)
    moved = x
    if SIGN != 0:
        term = coef * _load(direction_ptr + offs, mask).to(CD)
        if ADAPTIVE:
            term = term * x * x
        if SIGN > 0:
            moved = x + term
        else:
            moved = x - term
    if FROM_SOURCE:
        _store(p_ptr + offs, tl.where(write, moved, x), mask, tl.full((), 1, tl.int1))
    else:
        _store(p_ptr + offs, moved, mask, write)


# --------------------------------------------------------------------------------- kernels
@_jit
def msam_sgd_partials_kernel(table, partials, hyper, grad_scale, P: tl.constexpr,
                             STATE: tl.constexpr, HAS_GRAD: tl.constexpr, HAS_SCALE: tl.constexpr,
                             ALIGNED: tl.constexpr, UNROLL: tl.constexpr, ACC: tl.constexpr):
    """Operands: param, grad, momentum. Hyper: ``reference.MSAM_SGD_HYPER``."""
    rec, segment, lo, hi = _locate(table)
    CD: tl.constexpr = STATE
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, P, ALIGNED), _address(rec, 2, STATE, ALIGNED))
    values = (_hyper(hyper, 1, CD), _hyper(hyper, 2, CD), _grad_scale(grad_scale, CD, HAS_SCALE))
    total, bad = _walk_partials(_msam_sgd_direction_row, ptrs, values, (HAS_GRAD, HAS_SCALE),
                                lo, hi, UNROLL, ACC)
    _store_partials(partials, rec, segment, total, bad)


@_jit
def adamw_msam_partials_kernel(table, partials, hyper, grad_scale, P: tl.constexpr,
                               STATE: tl.constexpr, HAS_GRAD: tl.constexpr,
                               HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
                               UNROLL: tl.constexpr, ACC: tl.constexpr):
    """Operands: exp_avg, grad. Hyper: ``reference.ADAMW_MSAM_HYPER``."""
    rec, segment, lo, hi = _locate(table)
    CD: tl.constexpr = STATE
    ptrs = (_address(rec, 0, STATE, ALIGNED), _address(rec, 1, P, ALIGNED))
    beta1 = tl.load(hyper + 1)
    values = (beta1.to(CD), (1 - beta1).to(CD), _grad_scale(grad_scale, CD, HAS_SCALE))
    total, bad = _walk_partials(_adamw_msam_direction_row, ptrs, values, (HAS_GRAD, HAS_SCALE),
                                lo, hi, UNROLL, ACC)
    _store_partials(partials, rec, segment, total, bad)


@_jit
def sam_ascent_partials_kernel(table, partials, P: tl.constexpr, CD: tl.constexpr,
                               ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr,
                               UNROLL: tl.constexpr, ACC: tl.constexpr):
    """Operands: param, grad."""
    rec, segment, lo, hi = _locate(table)
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, P, ALIGNED))
    total, bad = _walk_partials(_ascent_term_row, ptrs, (tl.zeros((), CD),), (ADAPTIVE,), lo, hi,
                                UNROLL, ACC)
    _store_partials(partials, rec, segment, total, bad)


@_jit
def msam_sgd_step_kernel(table, hyper, coef_old, coef_new, grad_scale, found_inf,
                         P: tl.constexpr, STATE: tl.constexpr, HAS_GRAD: tl.constexpr,
                         HAS_MASTER: tl.constexpr, HAS_SCALE: tl.constexpr,
                         HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, UNROLL: tl.constexpr):
    """Operands: param, grad, momentum, master. Hyper: ``reference.MSAM_SGD_HYPER``."""
    rec, _, lo, hi = _locate(table)
    CD: tl.constexpr = STATE
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, P, ALIGNED),
            _address(rec, 2, STATE, ALIGNED), _address(rec, 3, tl.float32, ALIGNED))
    values = (_hyper(hyper, 0, CD), _hyper(hyper, 1, CD), _hyper(hyper, 2, CD),
              tl.load(coef_old).to(CD), tl.load(coef_new).to(CD),
              _grad_scale(grad_scale, CD, HAS_SCALE), _flag_clear(found_inf, HAS_FOUND_INF))
    _walk(_msam_sgd_step_row, ptrs, values, (HAS_GRAD, HAS_MASTER, HAS_SCALE), lo, hi, UNROLL)


@_jit
def adamw_msam_step_kernel(table, hyper, coef_old, coef_new, grad_scale, found_inf,
                           P: tl.constexpr, STATE: tl.constexpr, HAS_GRAD: tl.constexpr,
                           HAS_MASTER: tl.constexpr, HAS_SCALE: tl.constexpr,
                           HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
                           UNROLL: tl.constexpr):
    """Operands: param, grad, exp_avg, exp_avg_sq, master, step (the count before this step;
    ``advance_steps_kernel`` increments it once every program has read it).
    Hyper: ``reference.ADAMW_MSAM_HYPER``."""
    rec, _, lo, hi = _locate(table)
    CD: tl.constexpr = STATE
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, P, ALIGNED),
            _address(rec, 2, STATE, ALIGNED), _address(rec, 3, STATE, ALIGNED),
            _address(rec, 4, tl.float32, ALIGNED))
    lr = tl.load(hyper)
    beta1 = tl.load(hyper + 1)
    beta2 = tl.load(hyper + 2)
    one_minus_beta1 = 1 - beta1  # exact in float64 for beta in [0.5, 1]
    one_minus_beta2 = 1 - beta2
    # the bias corrections of reference.adam_bias at t + 1, in float64, once per program
    t = tl.load(_address(rec, 5, tl.float32, False)).to(tl.float64) + 1
    bias1 = -_expm1(t * _log1p(-one_minus_beta1))
    bias2 = -_expm1(t * _log1p(-one_minus_beta2))
    values = (beta1.to(CD), one_minus_beta1.to(CD), beta2.to(CD), one_minus_beta2.to(CD),
              _hyper(hyper, 3, CD), (1 - lr * tl.load(hyper + 4)).to(CD),
              _div_rn(lr, bias1).to(CD), _sqrt_rn(bias2).to(CD),
              tl.load(coef_old).to(CD), tl.load(coef_new).to(CD),
              _grad_scale(grad_scale, CD, HAS_SCALE), _flag_clear(found_inf, HAS_FOUND_INF))
    _walk(_adamw_msam_step_row, ptrs, values, (HAS_GRAD, HAS_MASTER, HAS_SCALE), lo, hi, UNROLL)


@_jit
def msam_sgd_overlap_stash_kernel(table, partials, hyper, grad_scale, P: tl.constexpr,
                                  HAS_SCALE: tl.constexpr, ALIGNED: tl.constexpr,
                                  UNROLL: tl.constexpr, ACC: tl.constexpr):
    """Operands: param, grad (receives the old momentum), momentum; float32/float64 only, so
    the state dtype is the parameters'. Hyper: ``reference.MSAM_SGD_HYPER``."""
    rec, segment, lo, hi = _locate(table)
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, P, ALIGNED), _address(rec, 2, P, ALIGNED))
    values = (_hyper(hyper, 1, P), _hyper(hyper, 2, P), _grad_scale(grad_scale, P, HAS_SCALE))
    total, bad = _walk_partials(_stash_row, ptrs, values, (HAS_SCALE,), lo, hi, UNROLL, ACC)
    _store_partials(partials, rec, segment, total, bad)


@_jit
def msam_sgd_overlap_finish_kernel(table, hyper, coef_old, coef_new, found_inf, P: tl.constexpr,
                                   HAS_STASH: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                                   ALIGNED: tl.constexpr, UNROLL: tl.constexpr):
    """Operands: param, stash (the old momentum), momentum (the new one)."""
    rec, _, lo, hi = _locate(table)
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, P, ALIGNED), _address(rec, 2, P, ALIGNED))
    values = (_hyper(hyper, 0, P), tl.load(coef_old).to(P), tl.load(coef_new).to(P),
              _flag_clear(found_inf, HAS_FOUND_INF))
    _walk(_finish_row, ptrs, values, (HAS_STASH, HAS_FOUND_INF), lo, hi, UNROLL)


@_jit
def advance_steps_kernel(table, found_inf, HAS_FOUND_INF: tl.constexpr):
    """Operand: a float32 step counter; one program per counter adds one unless skipped."""
    rec, _, _, _ = _locate(table)
    step = _address(rec, 0, tl.float32, False)
    tl.store(step, tl.load(step) + 1, mask=_flag_clear(found_inf, HAS_FOUND_INF))


@_jit
def move_kernel(table, coef, found_inf, P: tl.constexpr, DIRECTION: tl.constexpr,
                SOURCE: tl.constexpr, CD: tl.constexpr, FROM_SOURCE: tl.constexpr,
                SIGN: tl.constexpr, ADAPTIVE: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, UNROLL: tl.constexpr):
    """Operands: param, direction, source (see ``_move_row``)."""
    rec, _, lo, hi = _locate(table)
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, DIRECTION, ALIGNED),
            _address(rec, 2, SOURCE, ALIGNED))
    values = (_coefficient(coef, CD, SIGN != 0), _flag_clear(found_inf, HAS_FOUND_INF))
    _walk(_move_row, ptrs, values, (FROM_SOURCE, SIGN, ADAPTIVE), lo, hi, UNROLL)


@_jit
def sum_segment_partials_kernel(partials, n_rows, total, nonfinite, ACC: tl.constexpr):
    """One program: ``total`` = the sum of column 0 of the ``[n_rows, 2]`` partials in a fixed
    order (row ``r`` into lane ``r % ROW``, then the pairwise tree), ``nonfinite`` = whether
    any marker of column 1 is NaN."""
    lanes = tl.arange(0, ROW)
    acc = tl.zeros([ROW], ACC)
    bad = tl.zeros([ROW], tl.int32)
    for base in range(0, n_rows, ROW):
        mask = base + lanes < n_rows
        acc += tl.load(partials + 2 * (base + lanes), mask=mask, other=0).to(ACC)
        marker = tl.load(partials + 2 * (base + lanes) + 1, mask=mask, other=0)
        bad = tl.maximum(bad, (marker != marker).to(tl.int32))
    tl.store(total + tl.arange(0, 1), _pairwise_sum(acc, ROW, LOG2_ROW))
    tl.store(nonfinite, tl.max(bad, 0) > 0)


@_jit
def perturbation_coef_kernel(sum_of_squares, rho, coef_old, found_inf, out,
                             HAS_FOUND_INF: tl.constexpr):
    """``out = rho / (sqrt(sum_of_squares) + EPS_NORM)`` in float64, or ``coef_old`` when
    skipped."""
    total = tl.load(sum_of_squares).to(tl.float64)
    coef = _div_rn(tl.load(rho).to(tl.float64), _sqrt_rn(total) + EPS_NORM)
    coef = coef.to(out.dtype.element_ty)
    if HAS_FOUND_INF:
        coef = tl.where(tl.load(found_inf) == 0, coef, tl.load(coef_old))
    tl.store(out, coef)
