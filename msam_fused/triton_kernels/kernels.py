"""The Triton kernels: one program per chunk of one tensor of a bucket, reached through a table.

A launch covers every tensor of a bucket. The host builds an int64 table (``layout.py``):
``table[2*pid]`` is the offset of the record of the tensor that program ``pid`` works on and
``table[2*pid + 1]`` the index of its chunk of ``CHUNK`` elements; a record is
``[numel, address of operand 0, address of operand 1, ...]``. A program walks its chunk in rows
of ``ROW`` elements: whole blocks of ``UNROLL`` rows with unmasked, vectorizable loads, then
the rest row by row with masks.

Sums of squares are deterministic and do not depend on the tuning (``UNROLL``, ``num_warps``):
element ``i`` of a chunk is added to lane ``i % ROW`` in order, the lanes are combined by a
fixed pairwise tree (every addition adds exactly two values, so the thread layout cannot
change the result), and each program writes its partial sum to its own slot. One small kernel
then adds the slots in a fixed order. No float atomics anywhere.

Arithmetic runs in the compute dtype ``CD`` (float32, or float64 for float64 tensors) and each
result is rounded to its storage dtype once, where it is written, as in ``reference.py``.
Hyper-parameters arrive as the bits of a Python float (int64), so float64 buckets get them
exactly (Triton passes float arguments as float32).
"""

import triton
import triton.language as tl

# Triton kernels may read module globals only when they are constexpr.
ROW = tl.constexpr(1024)
LOG2_ROW = tl.constexpr(10)
CHUNK = tl.constexpr(32 * 1024)  # elements per program; fixed so partial sums ignore tuning
EPS_NORM = tl.constexpr(1e-12)   # reference.EPS_NORM

# Hyper-parameter arguments: their values change from step to step, so the kernels are not
# specialised on them (that would recompile whenever one becomes divisible by 16).
_HYPERS = ["lr_bits", "weight_decay_bits", "momentum_bits", "beta1_bits", "one_minus_beta1_bits",
           "beta2_bits", "one_minus_beta2_bits", "eps_bits", "decay_bits", "n_partials",
           "n_steps", "rho_bits"]


def _jit(fn):
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(fn, do_not_specialize=[n for n in names if n in _HYPERS])


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
def _double(bits):
    """The float64 whose bits the host passed (``struct`` of a Python float)."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True)


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
    """The record of this program's tensor and the element range [lo, hi) of its chunk."""
    pid = tl.program_id(0).to(tl.int64)
    rec = table + tl.load(table + 2 * pid)
    lo = tl.load(table + 2 * pid + 1) * CHUNK
    hi = tl.minimum(lo + CHUNK, tl.load(rec))
    return rec, lo, hi


@_device_fn
def _address(rec, operand, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(rec + 1 + operand).to(tl.pointer_type(DTYPE))
    if ALIGNED:  # every address of the launch is 16-byte aligned: allow vector loads
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
def _walk(ROW_FN: tl.constexpr, ptrs, values, FLAGS: tl.constexpr, lo, hi,
          UNROLL: tl.constexpr, ACC: tl.constexpr):
    """Apply ``ROW_FN`` to the rows of [lo, hi); return the lane sums of the squares of what
    it returns (in ``ACC``), or nothing when ``ACC`` is None."""
    BLOCK: tl.constexpr = UNROLL * ROW
    lanes = tl.arange(0, ROW)
    full_end = lo + (hi - lo) // BLOCK * BLOCK
    if ACC is not None:
        acc = tl.zeros([ROW], ACC)
        for base in range(lo, full_end, BLOCK):
            for r in tl.static_range(UNROLL):
                x = ROW_FN(ptrs, base + r * ROW + lanes, None, values, FLAGS).to(ACC)
                acc += x * x
        for base in range(full_end, hi, ROW):
            offs = base + lanes
            x = ROW_FN(ptrs, offs, offs < hi, values, FLAGS).to(ACC)
            acc += x * x
        return _pairwise_sum(acc, ROW, LOG2_ROW)
    else:
        for base in range(lo, full_end, BLOCK):
            for r in tl.static_range(UNROLL):
                ROW_FN(ptrs, base + r * ROW + lanes, None, values, FLAGS)
        for base in range(full_end, hi, ROW):
            offs = base + lanes
            ROW_FN(ptrs, offs, offs < hi, values, FLAGS)
        return 0.0


# --------------------------------------------------------------------------- row functions
@_device_fn
def _gradient(ptr, mask, grad_scale, CD: tl.constexpr, HAS_SCALE: tl.constexpr):
    """The gradient in the compute dtype, divided by GradScaler's scale when there is one."""
    g = _load(ptr, mask).to(CD)
    if HAS_SCALE:
        g = g / grad_scale
    return g


@_device_fn
def _msam_sgd_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """SPEC §1 MSAM steps 1-4 for one row; returns the new momentum."""
    p_ptr, grad_ptr, v_ptr, master_ptr = ptrs
    lr, weight_decay, momentum, coef, grad_scale, write = values
    HAS_GRAD: tl.constexpr = FLAGS[0]
    HAS_MASTER: tl.constexpr = FLAGS[1]
    HAS_SCALE: tl.constexpr = FLAGS[2]
    CD: tl.constexpr = coef.dtype
    p = _load(p_ptr + offs, mask).to(CD)
    v = _load(v_ptr + offs, mask).to(CD)
    if HAS_MASTER:
        w = _load(master_ptr + offs, mask).to(CD)
    else:
        w = p + coef * v
    if HAS_GRAD:
        g = _gradient(grad_ptr + offs, mask, grad_scale, CD, HAS_SCALE)
        v = momentum * v + (g + weight_decay * p)
        w = w - lr * v
        _store(v_ptr + offs, v, mask, write)
    _store(master_ptr + offs if HAS_MASTER else p_ptr + offs, w, mask, write)
    return v


@_device_fn
def _adamw_msam_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """SPEC §1 AdamW-MSAM steps 1-4 for one row; returns the new first moment."""
    p_ptr, grad_ptr, m_ptr, s_ptr, master_ptr = ptrs
    (beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bias2_sqrt, coef,
     grad_scale, write) = values
    HAS_GRAD: tl.constexpr = FLAGS[0]
    HAS_MASTER: tl.constexpr = FLAGS[1]
    HAS_SCALE: tl.constexpr = FLAGS[2]
    CD: tl.constexpr = coef.dtype
    m = _load(m_ptr + offs, mask).to(CD)
    if HAS_MASTER:
        w = _load(master_ptr + offs, mask).to(CD)
    else:
        w = _load(p_ptr + offs, mask).to(CD) + coef * m
    if HAS_GRAD:
        g = _gradient(grad_ptr + offs, mask, grad_scale, CD, HAS_SCALE)
        s = _load(s_ptr + offs, mask).to(CD)
        m = beta1 * m + one_minus_beta1 * g
        s = beta2 * s + one_minus_beta2 * g * g
        w = w - step_size * m / (tl.sqrt(s) / bias2_sqrt + eps)
        w = w * decay
        _store(m_ptr + offs, m, mask, write)
        _store(s_ptr + offs, s, mask, write)
    _store(master_ptr + offs if HAS_MASTER else p_ptr + offs, w, mask, write)
    return m


@_device_fn
def _move_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """``p = source + SIGN * coef * direction`` (times ``p**2`` when ADAPTIVE).

    ``source`` is ``p`` itself, or another tensor (master weights, SAM's backup) when
    FROM_SOURCE; ``SIGN = 0`` is a plain copy. SAVE_BACKUP first copies ``p`` to ``backup``.
    """
    p_ptr, direction_ptr, source_ptr, backup_ptr = ptrs
    coef, write = values
    FROM_SOURCE: tl.constexpr = FLAGS[0]
    SIGN: tl.constexpr = FLAGS[1]
    ADAPTIVE: tl.constexpr = FLAGS[2]
    SAVE_BACKUP: tl.constexpr = FLAGS[3]
    CD: tl.constexpr = coef.dtype
    if FROM_SOURCE:
        x = _load(source_ptr + offs, mask).to(CD)
    else:
        stored = _load(p_ptr + offs, mask)
        if SAVE_BACKUP:
            _store(backup_ptr + offs, stored, mask, tl.full((), 1, tl.int1))
        x = stored.to(CD)
    if SIGN != 0:
        term = coef * _load(direction_ptr + offs, mask).to(CD)
        if ADAPTIVE:
            term = term * x * x
        if SIGN > 0:
            x = x + term
        else:
            x = x - term
    _store(p_ptr + offs, x, mask, write)
    return x


@_device_fn
def _ascent_term_row(ptrs, offs, mask, values, FLAGS: tl.constexpr):
    """SAM's ascent direction before normalisation: ``g``, or ``|p| * g`` when ADAPTIVE."""
    p_ptr, grad_ptr = ptrs
    (probe,) = values
    ADAPTIVE: tl.constexpr = FLAGS[0]
    CD: tl.constexpr = probe.dtype
    g = _load(grad_ptr + offs, mask).to(CD)
    if ADAPTIVE:
        g = tl.abs(_load(p_ptr + offs, mask).to(CD)) * g
    return g


# --------------------------------------------------------------------------------- kernels
@_jit
def msam_sgd_kernel(table, partials, lr_bits, weight_decay_bits, momentum_bits, coef, grad_scale,
                    found_inf, P: tl.constexpr, STATE: tl.constexpr, HAS_GRAD: tl.constexpr,
                    HAS_MASTER: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                    ALIGNED: tl.constexpr, UNROLL: tl.constexpr, ACC: tl.constexpr):
    """Operands: param, grad, momentum, master."""
    rec, lo, hi = _locate(table)
    CD: tl.constexpr = STATE
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, P, ALIGNED),
            _address(rec, 2, STATE, ALIGNED), _address(rec, 3, tl.float32, ALIGNED))
    values = (_double(lr_bits).to(CD), _double(weight_decay_bits).to(CD),
              _double(momentum_bits).to(CD), tl.load(coef).to(CD), _grad_scale(grad_scale, CD, HAS_SCALE),
              _flag_clear(found_inf, HAS_FOUND_INF))
    total = _walk(_msam_sgd_row, ptrs, values, (HAS_GRAD, HAS_MASTER, HAS_SCALE), lo, hi, UNROLL, ACC)
    tl.store(partials + tl.program_id(0) + tl.arange(0, 1), total)


@_jit
def adamw_msam_kernel(table, partials, lr_bits, beta1_bits, one_minus_beta1_bits, beta2_bits,
                      one_minus_beta2_bits, eps_bits, decay_bits, coef, grad_scale, found_inf,
                      P: tl.constexpr, STATE: tl.constexpr, HAS_GRAD: tl.constexpr,
                      HAS_MASTER: tl.constexpr, HAS_SCALE: tl.constexpr,
                      HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, UNROLL: tl.constexpr,
                      ACC: tl.constexpr):
    """Operands: param, grad, exp_avg, exp_avg_sq, master, step (the count before this step)."""
    rec, lo, hi = _locate(table)
    CD: tl.constexpr = STATE
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, P, ALIGNED),
            _address(rec, 2, STATE, ALIGNED), _address(rec, 3, STATE, ALIGNED),
            _address(rec, 4, tl.float32, ALIGNED))
    beta1 = _double(beta1_bits).to(CD)
    beta2 = _double(beta2_bits).to(CD)
    # bias corrections at t + 1; the finish kernel advances t once all programs are done
    t = (tl.load(_address(rec, 5, tl.float32, False)) + 1).to(CD)
    bias1 = 1 - tl.exp2(t * tl.log2(beta1))
    bias2_sqrt = tl.sqrt(1 - tl.exp2(t * tl.log2(beta2)))
    values = (beta1, _double(one_minus_beta1_bits).to(CD), beta2,
              _double(one_minus_beta2_bits).to(CD), _double(eps_bits).to(CD),
              _double(decay_bits).to(CD), _double(lr_bits).to(CD) / bias1, bias2_sqrt,
              tl.load(coef).to(CD), _grad_scale(grad_scale, CD, HAS_SCALE), _flag_clear(found_inf, HAS_FOUND_INF))
    total = _walk(_adamw_msam_row, ptrs, values, (HAS_GRAD, HAS_MASTER, HAS_SCALE), lo, hi,
                  UNROLL, ACC)
    tl.store(partials + tl.program_id(0) + tl.arange(0, 1), total)


@_jit
def move_kernel(table, coef, found_inf, P: tl.constexpr, DIRECTION: tl.constexpr,
                SOURCE: tl.constexpr, CD: tl.constexpr, FROM_SOURCE: tl.constexpr,
                SIGN: tl.constexpr, ADAPTIVE: tl.constexpr, SAVE_BACKUP: tl.constexpr,
                HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, UNROLL: tl.constexpr):
    """Operands: param, direction, source, backup (see ``_move_row``)."""
    rec, lo, hi = _locate(table)
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, DIRECTION, ALIGNED),
            _address(rec, 2, SOURCE, ALIGNED), _address(rec, 3, P, ALIGNED))
    values = (_coefficient(coef, CD, SIGN != 0), _flag_clear(found_inf, HAS_FOUND_INF))
    _walk(_move_row, ptrs, values, (FROM_SOURCE, SIGN, ADAPTIVE, SAVE_BACKUP), lo, hi, UNROLL, None)


@_jit
def ascent_sum_of_squares_kernel(table, partials, P: tl.constexpr, CD: tl.constexpr,
                                 ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr,
                                 UNROLL: tl.constexpr, ACC: tl.constexpr):
    """Operands: param, grad."""
    rec, lo, hi = _locate(table)
    ptrs = (_address(rec, 0, P, ALIGNED), _address(rec, 1, P, ALIGNED))
    total = _walk(_ascent_term_row, ptrs, (tl.zeros((), CD),), (ADAPTIVE,), lo, hi, UNROLL, ACC)
    tl.store(partials + tl.program_id(0) + tl.arange(0, 1), total)


@_jit
def finish_kernel(partials, n_partials, out, step_records, n_steps, found_inf,
                  RECORD_WIDTH: tl.constexpr, STEP_OPERAND: tl.constexpr, HAS_STEPS: tl.constexpr,
                  HAS_FOUND_INF: tl.constexpr, ACC: tl.constexpr):
    """One program: ``out = sum(partials)`` in a fixed order; then, unless the step is
    skipped, add one to the float32 step counter of each of the first ``n_steps`` records."""
    lanes = tl.arange(0, ROW)
    acc = tl.zeros([ROW], ACC)
    for base in range(0, n_partials, ROW):
        acc += tl.load(partials + base + lanes, mask=base + lanes < n_partials, other=0)
    tl.store(out + tl.arange(0, 1), _pairwise_sum(acc, ROW, LOG2_ROW))
    if HAS_STEPS:
        write = _flag_clear(found_inf, HAS_FOUND_INF)
        for base in range(0, n_steps, ROW):
            mask = base + lanes < n_steps
            address = tl.load(step_records + (base + lanes) * RECORD_WIDTH + 1 + STEP_OPERAND,
                              mask=mask, other=0)
            step = address.to(tl.pointer_type(tl.float32))
            tl.store(step, tl.load(step, mask=mask) + 1, mask=_both(mask, write))


@_jit
def perturbation_coef_kernel(sum_of_squares, coef_old, found_inf, out, rho_bits,
                             HAS_FOUND_INF: tl.constexpr):
    """``out = rho / (sqrt(sum_of_squares) + EPS_NORM)``, or ``coef_old`` when skipped."""
    total = tl.load(sum_of_squares)
    coef = (_double(rho_bits).to(total.dtype) / (tl.sqrt(total) + EPS_NORM)).to(out.dtype.element_ty)
    if HAS_FOUND_INF:
        coef = tl.where(tl.load(found_inf) == 0, coef, tl.load(coef_old))
    tl.store(out, coef)
