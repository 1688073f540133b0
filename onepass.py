"""One pass for every network: the tangent rules that keep autograd from recording a JVP's tangent, written once,
used by model.py's networks (its primitives call them) and by `OnePass`, a mode that gives a network of stock layers
(nn.Linear, nn.Conv2d, nn.LayerNorm, F.scaled_dot_product_attention, ...) the same one-pass sCM step unedited.
Imports torch only; copy it beside trigflow.py.

  jvp = trigflow.JVP(net, mode=onepass.OnePass)           # a stock network: F and its tangent, one pass
  loss, terms = trigflow.scm_loss(F, x_t, t, dxdt, jvp=lambda u, t, tangents: jvp(u, t, labels, tangents=tangents))
  print(onepass.audit(lambda u, t: net(u, t, labels), (u, t), tangents))   # what, if anything, is still recorded

Ops under the rules: linear, conv1d/2d/3d, conv_transpose1d/2d/3d, group_norm, layer_norm, silu, gelu, softmax,
mul / matmul / div by a tensor (or a number), dropout, scaled_dot_product_attention without mask, dropout or causal
flag. Any other op stays correct, with PyTorch's own rule, which autograd records (einsum, bmm, exp, custom kernels,
in-place ops): `audit` names them. torch.compile of the JVP is not supported (it fails on a jvp).
"""
import math

import torch
import torch.nn.functional as nnf
import torch.autograd.forward_ad as fwAD
from torch.autograd.graph import get_gradient_edge
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

# ---------------------------------------------------------------------------------------------------------------
# Primitives whose tangent autograd does not record: the one-pass sCM step (trigflow.scm_loss).
#
# scm_loss runs the student once under a grad-enabled torch.func.jvp: the primal is F_theta, with its gradient, and
# the tangent cos(t) sin(t) dF/dt, which Alg. 1 uses under stopgrad. PyTorch evaluates forward-mode rules in grad
# mode, so a rule that touches a grad-requiring primal (a weight, an activation) is recorded by autograd: conv's
# rule conv(x_t, w) keeps x_t for w's gradient, and even x * 2 records 0 * x. Nothing ever differentiates those
# records; they tripled the sCD step's peak memory (bench.py's 'sCD stock' row). So every primitive whose rule
# touches such a primal goes through _NoGradTangent: its value and its backward are the native op's, its tangent a
# formula written out below and evaluated under no_grad. Ops whose rule touches no primal need nothing: +, -, cat,
# views, casts, clip, pooling, repeat, and `mul_scalar` below. Without a tangent (a diffusion step, sampling) each
# primitive is the plain native op.


def _wide(dtype):
    return torch.promote_types(dtype, torch.float32)


def _has_tangent(x):
    """True inside torch.func transforms (jvp, grad, vmap wrap their tensors) and for forward_ad dual tensors."""
    return torch.is_tensor(x) and (torch._C._functorch.is_functorch_wrapped_tensor(x) or
                                   fwAD.unpack_dual(x).tangent is not None)


class _NoGradTangent(torch.autograd.Function):
    """y = op(*xs) with op's own backward and the tangent rule(xs, xs_t, y), computed under no_grad.

    forward runs op with autograd enabled on a fresh alias of each input (x.view_as(x), free) and keeps only the two
    ends of that inner graph (gradient edges, which hold no activations); backward differentiates the inner graph from
    end to end. The aliases make the ends this op's alone: with the inputs' own edges, an input reached from another
    through the outer graph (mul(h + 1, h), SwiGLU's silu(a) * b) would have that shared path run by the inner
    backward and again by the outer engine, a wrong gradient with no error. Tensors are saved exactly as the native
    op saves them, and none of them carries a tangent."""
    generate_vmap_rule = True

    @staticmethod
    def forward(op, rule, grad_enabled, *xs):
        with torch.set_grad_enabled(grad_enabled):
            xs = [x.view_as(x) if _requires_grad(x) else x for x in xs]   # a fresh alias of each: see below
            y = op(*xs)
        ends = _Opaque()           # one leaf for torch.func's pytree handling of the outputs: flattening is not free
        if y.requires_grad:
            ends.value = (get_gradient_edge(y), [get_gradient_edge(x) if _requires_grad(x) else None for x in xs])
        return y.detach(), ends

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.rule, ctx.ends = inputs[1], output[1].value
        ctx.save_for_forward(*inputs[3:], output[0])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, gy, _):
        (y_edge, x_edges), ctx.ends = ctx.ends, None
        grads = iter(torch.autograd.grad(y_edge, [e for e in x_edges if e is not None], gy))
        return (None, None, None) + tuple(None if e is None else next(grads) for e in x_edges)

    @staticmethod
    def jvp(ctx, _op_t, _rule_t, _grad_t, *xs_t):
        xs, y = tuple(ctx.saved_tensors[:-1]), ctx.saved_tensors[-1]
        ctx.saved_for_forward = None              # the graph keeps ctx alive: do not let it keep xs and y
        with torch.no_grad():
            return ctx.rule(xs, xs_t, y).to(y.dtype), None


class _Opaque:
    value = None


def _requires_grad(x):
    return torch.is_tensor(x) and x.requires_grad


def _primitive(op, rule, *xs):
    """op(*xs); under a tangent, through _NoGradTangent with the tangent rule(xs, xs_t, y)."""
    if not any(_has_tangent(x) for x in xs):
        return op(*xs)
    return _NoGradTangent.apply(op, rule, torch.is_grad_enabled(), *xs)[0]


def _add(*terms):
    """The sum of the terms that are not None (an input without a tangent contributes no term); None if all are."""
    total = None
    for v in terms:
        total = v if total is None else total if v is None else total + v
    return total


def mul_scalar(x, c):
    """x * c for a number c. aten's mul.Scalar, whose tangent rule is x_t * c; Python's `x * c` is mul.Tensor, whose
    rule x_t * c + 0 * x touches x and is recorded."""
    return torch.ops.aten.mul.Scalar(x, c)


def silu(x):
    """SiLU x sigmoid(x). Tangent: x_t s (1 + x (1 - s)), s = sigmoid(x): x_t silu'(x), which is what aten's fused
    silu_backward(grad, x) computes with grad = x_t (one kernel instead of six)."""
    return _primitive(nnf.silu, _silu_tangent, x)


def _silu_tangent(xs, ts, y):
    return torch.ops.aten.silu_backward(ts[0], xs[0])


def gelu(x):
    """GELU, tanh approximation (DiT). Tangent: x_t (0.5 (1 + h) + 0.5 x (1 - h^2) k (1 + 3a x^2)),
    h = tanh(k (x + a x^3)), k = sqrt(2/pi), a = 0.044715: x_t gelu'(x), aten's fused gelu_backward(x_t, x)."""
    return _primitive(_gelu, _gelu_tangent, x)


def _gelu(x):
    return nnf.gelu(x, approximate='tanh')


def _gelu_tangent(xs, ts, y):
    return torch.ops.aten.gelu_backward(ts[0], xs[0], approximate='tanh')


def mul(a, b):
    """a * b, broadcasting. Tangent: a_t b + a b_t."""
    return _primitive(torch.mul, _mul_tangent, a, b)


def _mul_tangent(xs, ts, y):
    (a, b), (a_t, b_t) = xs, ts
    if a_t is not None and b_t is not None:
        return torch.addcmul(a_t * b, a, b_t)
    return a_t * b if b_t is None else a * b_t


def dropout(x, p, training):
    """nnf.dropout as x * mask, the mask drawn as nnf.dropout draws it (PyTorch's rule for dropout records 0 * x)."""
    if not training or p == 0:
        return x
    return mul(x, nnf.dropout(torch.ones_like(x), p, True))


def _standardized_tangent(x, x_t, eps):
    """For y = (x - mean x) / sigma over the last dim, sigma = sqrt(var x + eps): (y, y_t) with
    y_t = (x_c - y mean(y x_c)) / sigma, x_c = x_t - mean x_t. That Jacobian is symmetric, so y_t is also its
    backward at the gradient x_t: aten's fused native_layer_norm_backward (one kernel; 6x faster than the formula on a
    CPU). In fp32 or wider."""
    x, x_t = x.to(_wide(x.dtype)), x_t.to(_wide(x.dtype))
    y, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, eps)
    return y, torch.ops.aten.native_layer_norm_backward(x_t, x, x.shape[-1:], mean, rstd, None, None,
                                                        [True, False, False])[0]


def layer_norm(x, eps=1e-6):
    """LayerNorm over the last dim without an affine map (DiT's). Tangent: _standardized_tangent."""
    return _primitive(lambda x: nnf.layer_norm(x, x.shape[-1:], eps=eps),
                      lambda xs, ts, y: _standardized_tangent(xs[0], ts[0], eps)[1], x)


def group_norm(x, gn):
    """nn.GroupNorm `gn` computed in fp32 or wider (a bf16 GroupNorm breaks the JVP under autocast), on a contiguous
    x. Tangent: the standardized tangent per group, times the weight (plus the terms of weight and bias tangents)."""
    with torch.autocast(x.device.type, enabled=False):
        xw = x.to(_wide(x.dtype)).contiguous()
        y = _primitive(lambda x, w, b: nnf.group_norm(x, gn.num_groups, w, b, gn.eps),
                       lambda xs, ts, y: _group_norm_tangent(xs, ts, gn.num_groups, gn.eps), xw, gn.weight, gn.bias)
    return y.to(x.dtype)


def _group_norm_tangent(xs, ts, groups, eps):
    (x, w, _), (x_t, w_t, b_t) = xs, ts
    def per_channel(v):
        return v.reshape(1, -1, *([1] * (x.ndim - 2)))
    y, y_t = _standardized_tangent(x.reshape(x.shape[0], groups, -1), x_t.reshape(x.shape[0], groups, -1), eps)
    y, y_t = y.reshape(x.shape), y_t.reshape(x.shape)
    return _add(y_t if w is None else y_t * per_channel(w), None if w_t is None else y * per_channel(w_t),
                None if b_t is None else per_channel(b_t).expand_as(y))


def _affine(x, w, b=None, stride=1):
    """conv2d (+ b) for a 4-D weight: 'same' padding at stride 1, non-overlapping patches at stride > 1 (DiT's patch
    embedding); x @ w^T + b for a 2-D one."""
    if w.ndim == 4:
        return nnf.conv2d(x, w, b, stride=stride, padding=w.shape[-1] // 2 if stride == 1 else 0)
    return nnf.linear(x, w, b)


def affine(x, w, b=None, stride=1):
    """conv2d / linear (_affine) with its tangent written out: x_t's term, plus the weight's and the bias's when they
    have tangents. PyTorch's own rules also evaluate op(x, w_t) with a zero w_t when the weight has none -- as
    under sCM's JVP, where only x_t and t carry tangents -- one more full convolution or matmul per layer (measured
    on CPU: a conv's JVP cost 2.75 forwards and a linear's 3.4 instead of 2). Under autocast the inputs are cast
    here, as autocast would cast them for conv2d and linear, so that the value and the tangent share one dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        x, w, b = x.to(dt), w.to(dt), None if b is None else b.to(dt)
    with torch.autocast(dev, enabled=False):
        if b is None:
            return _primitive(lambda x, w: _affine(x, w, stride=stride),
                              lambda xs, ts, y: _affine_tangent(xs + (None,), ts + (None,), stride), x, w)
        return _primitive(lambda x, w, b: _affine(x, w, b, stride),
                          lambda xs, ts, y: _affine_tangent(xs, ts, stride, y), x, w, b)


def _affine_tangent(xs, ts, stride, y=None):
    (x, w, _), (x_t, w_t, b_t) = xs, ts
    return _add(None if x_t is None else _affine(x_t, w, stride=stride),
                None if w_t is None else _affine(x, w_t, stride=stride),
                None if b_t is None else (b_t.reshape(-1, 1, 1) if w.ndim == 4 else b_t).expand_as(y))


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v over [B, heads, L, d]: fused SDPA, value and backward, also under a tangent. The
    fused kernels have no forward-mode rule (pytorch #128971), so the tangent is sCM App. F's, with S = q k^T /
    sqrt(d), P = softmax(S), y = P v:  y_t = (P * S_t) v - rowsum(P * S_t) y + P v_t,  S_t = (q_t k^T + q k_t^T) /
    sqrt(d), with the softmax in fp32 or wider."""
    return _primitive(_sdpa, _attention_tangent, q, k, v)


_SDPA_ALL = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]


def _sdpa(q, k, v):
    with sdpa_kernel(_SDPA_ALL):          # fused where it applies, even inside trigflow's math-only block
        return nnf.scaled_dot_product_attention(q, k, v)


ATTENTION_BLOCK = 256      # query rows per block of the attention tangent: transient memory O(block x L), not O(L^2)


def _attention_tangent(xs, ts, y, scale=None, block=ATTENTION_BLOCK):
    """App. F's tangent, one block of query rows at a time (each row's softmax needs only its own scores), so that the
    [L, L] score, softmax and S_t tensors exist only block x L at a time; block >= L is the explicit form."""
    (q, k, v), (q_t, k_t, v_t) = xs, ts
    s = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, q_t = q * s, None if q_t is None else q_t * s            # the scale on [L, d], not on the [L, L] scores
    out = []
    for i in range(0, q.shape[-2], block):
        rows = slice(i, i + block)
        P = (q[..., rows, :] @ k.transpose(-2, -1)).to(_wide(q.dtype)).softmax(dim=-1)
        S_t = _add(None if q_t is None else q_t[..., rows, :] @ k.transpose(-2, -1),
                   None if k_t is None else q[..., rows, :] @ k_t.transpose(-2, -1))
        A = None if S_t is None else P * S_t.to(P.dtype)                             # P * S_t
        out.append(_add(None if A is None else A.to(v.dtype) @ v - A.sum(-1, keepdim=True) * y[..., rows, :].to(P.dtype),
                        None if v_t is None else P.to(v.dtype) @ v_t))
    return None if out[0] is None else out[0] if len(out) == 1 else torch.cat(out, dim=-2)


# ---------------------------------------------------------------------------------------------------------------
# Stock layers: OnePass routes PyTorch's functional ops through _primitive with the rules above, while a JVP runs.

def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _per_channel(v, y, channel_dim):
    """A per-channel vector shaped to broadcast against y along channel_dim (1: conv and group norm, -1: linear)."""
    return v if channel_dim == -1 else v.reshape(1, -1, *([1] * (y.ndim - 2)))


def _linear_in_each(func, args, kwargs, channel_dim):
    """linear, conv*, conv_transpose*: func(x, w, b, *rest). Tangent func(x_t, w) + func(x, w_t) + b_t."""
    x, w, b = args[0], args[1], _arg(args, kwargs, 2, 'bias')
    rest, kw = args[3:], {k: v for k, v in kwargs.items() if k != 'bias'}

    def lin(x, w):
        return func(x, w, None, *rest, **kw)

    def rule(xs, ts, y):
        return _add(None if ts[0] is None else lin(ts[0], xs[1]), None if ts[1] is None else lin(xs[0], ts[1]),
                    None if len(ts) < 3 or ts[2] is None else _per_channel(ts[2], y, channel_dim).expand_as(y))
    if b is None:
        return _primitive(lin, rule, x, w)
    return _primitive(lambda x, w, b: func(x, w, b, *rest, **kw), rule, x, w, b)


def _group_norm_stock(func, args, kwargs):
    x, groups, w, b = args[0], _arg(args, kwargs, 1, 'num_groups'), _arg(args, kwargs, 2, 'weight'), \
        _arg(args, kwargs, 3, 'bias')
    eps = _arg(args, kwargs, 4, 'eps', 1e-5)
    if w is None or b is None:
        return _primitive(lambda x: func(x, groups, w, b, eps),
                          lambda xs, ts, y: _group_norm_tangent((xs[0], w, None), (ts[0], None, None), groups, eps), x)
    return _primitive(lambda x, w, b: func(x, groups, w, b, eps),
                      lambda xs, ts, y: _group_norm_tangent(xs, ts, groups, eps), x, w, b)


def _layer_norm_stock(func, args, kwargs):
    x, shape, w, b = args[0], tuple(_arg(args, kwargs, 1, 'normalized_shape')), _arg(args, kwargs, 2, 'weight'), \
        _arg(args, kwargs, 3, 'bias')
    eps = _arg(args, kwargs, 4, 'eps', 1e-5)

    def rule(xs, ts, y):
        x, x_t = xs[0], ts[0]
        flat = lambda v: v.reshape(*v.shape[:v.ndim - len(shape)], -1)                    # noqa: E731
        n, n_t = (v.reshape(x.shape) for v in _standardized_tangent(flat(x), flat(x_t), eps))
        if len(xs) == 1:
            return n_t if w is None else n_t * w
        return _add(n_t * xs[1], None if ts[1] is None else n * ts[1], None if ts[2] is None else ts[2].expand_as(y))
    if w is None or b is None:
        return _primitive(lambda x: func(x, shape, w, b, eps), rule, x)
    return _primitive(lambda x, w, b: func(x, shape, w, b, eps), rule, x, w, b)


def _softmax_stock(func, args, kwargs):
    x, dim = args[0], _arg(args, kwargs, 1, 'dim')
    if dim is None or _arg(args, kwargs, 3 if func is nnf.softmax else 2, 'dtype') is not None:
        return NotImplemented

    def rule(xs, ts, y):                                                  # y (x_t - <y, x_t>), along dim
        return y * (ts[0] - (y * ts[0]).sum(dim, keepdim=True))
    return _primitive(lambda x: func(x, dim), rule, x)


def _binary_stock(kind):
    def handler(func, args, kwargs):
        a, b = args[0], args[1] if len(args) > 1 else kwargs.get('other')
        if kwargs.keys() - {'other'} or not torch.is_tensor(a):
            return NotImplemented
        if not torch.is_tensor(b):                        # a number: aten's .Scalar ops, whose rules touch no primal
            if kind == 'matmul' or not isinstance(b, (int, float)):
                return NotImplemented
            return torch.ops.aten.mul.Scalar(a, b) if kind == 'mul' else torch.ops.aten.div.Scalar(a, b)
        if kind == 'mul':
            return mul(a, b)
        if kind == 'matmul':
            return _primitive(torch.matmul, lambda xs, ts, y: _add(
                None if ts[0] is None else ts[0] @ xs[1], None if ts[1] is None else xs[0] @ ts[1]), a, b)
        return _primitive(torch.div, lambda xs, ts, y: _add(    # (a_t - y b_t) / b
            ts[0], None if ts[1] is None else -y * ts[1]) / xs[1], a, b)
    return handler


def _swapped(handler):
    return lambda func, args, kwargs: handler(func, (args[1], args[0]), kwargs)


def _sdpa_stock(func, args, kwargs):
    q, k, v = args[0], _arg(args, kwargs, 1, 'key'), _arg(args, kwargs, 2, 'value')
    if _arg(args, kwargs, 3, 'attn_mask') is not None or _arg(args, kwargs, 4, 'dropout_p', 0.0) or \
            _arg(args, kwargs, 5, 'is_causal', False) or kwargs.get('enable_gqa', False):
        return NotImplemented
    scale = _arg(args, kwargs, 6, 'scale')

    def op(q, k, v):
        with sdpa_kernel(_SDPA_ALL):
            return func(q, k, v, scale=scale)
    return _primitive(op, lambda xs, ts, y: _attention_tangent(xs, ts, y, scale), q, k, v)


def _unary_stock(rule):
    def handler(func, args, kwargs):
        if _arg(args, kwargs, 1, 'inplace', False) is True:
            return NotImplemented
        approximate = kwargs.get('approximate', 'none')
        return _primitive(lambda x: func(x, **kwargs), lambda xs, ts, y: rule(ts[0], xs[0], approximate), args[0])
    return handler


def _dropout_stock(func, args, kwargs):
    p, training = _arg(args, kwargs, 1, 'p', 0.5), _arg(args, kwargs, 2, 'training', True)
    if _arg(args, kwargs, 3, 'inplace', False):
        return NotImplemented
    return dropout(args[0], p, training)


_T = torch.Tensor
STOCK_RULES = {
    nnf.linear: lambda f, a, k: _linear_in_each(f, a, k, -1),
    **{f: (lambda f, a, k: _linear_in_each(f, a, k, 1)) for f in (
        nnf.conv1d, nnf.conv2d, nnf.conv3d, nnf.conv_transpose1d, nnf.conv_transpose2d, nnf.conv_transpose3d)},
    nnf.group_norm: _group_norm_stock, nnf.layer_norm: _layer_norm_stock,
    nnf.silu: _unary_stock(lambda x_t, x, _: torch.ops.aten.silu_backward(x_t, x)),
    nnf.gelu: _unary_stock(lambda x_t, x, approximate: torch.ops.aten.gelu_backward(x_t, x, approximate=approximate)),
    nnf.softmax: _softmax_stock, torch.softmax: _softmax_stock, _T.softmax: _softmax_stock,
    **{f: _binary_stock('mul') for f in (torch.mul, _T.mul, _T.__mul__, _T.__rmul__)},
    **{f: _binary_stock('matmul') for f in (torch.matmul, _T.matmul, _T.__matmul__)},
    _T.__rmatmul__: _swapped(_binary_stock('matmul')),
    **{f: _binary_stock('div') for f in (torch.div, _T.div, _T.__truediv__)},
    nnf.dropout: _dropout_stock, nnf.scaled_dot_product_attention: _sdpa_stock,
}


class OnePass(TorchFunctionMode):
    """While active, a functional op in STOCK_RULES whose inputs carry a tangent goes through _primitive: its value
    and backward are the op's own, its tangent the rule's, unrecorded. Everything else runs as it is. Use it around a
    grad-enabled torch.func.jvp only (trigflow.JVP(net, mode=OnePass) does); outside a JVP it changes nothing."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = STOCK_RULES.get(func)
        if handler is not None and any(_has_tangent(a) for a in args[:3]) or \
                handler is not None and any(_has_tangent(v) for v in kwargs.values()):
            out = handler(func, args, kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The audit: why is my network not one-pass?

def _storage_bytes(seen, x):
    try:
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):                   # a tangent inside a torch.func transform
        seen[id(x)] = x.numel() * x.element_size()
    return x


class _SavedByOp(TorchFunctionMode):
    """Bytes autograd saves for backward during each top-level torch function call, by the function's name."""

    def __init__(self):
        super().__init__()
        self.by_op, self.seen = {}, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        before = sum(self.seen.values())
        out = func(*args, **(kwargs or {}))
        name = getattr(func, '__qualname__', None) or getattr(func, '__name__', str(func))
        self.by_op[name] = self.by_op.get(name, 0) + sum(self.seen.values()) - before
        return out


def saved_by_op(fn):
    """(fn(), {op name: bytes of the distinct storages autograd saved for backward while that op ran})."""
    counter = _SavedByOp()
    with torch.autograd.graph.saved_tensors_hooks(lambda x: _storage_bytes(counter.seen, x), lambda x: x), counter:
        out = fn()
    return out, counter.by_op


def audit(fn, primals, tangents, mode=OnePass):
    """Run fn(*primals) as a plain forward and as the one-pass step runs it (a grad-enabled torch.func.jvp under
    `mode`), and say what the one pass saves for backward beyond the forward: {'forward': bytes, 'one_pass': bytes,
    'ratio': one_pass / forward, 'extra': {op: bytes beyond the forward's for that op}}. ratio 1.0 and no extra: the
    network is one-pass. An op in 'extra' is outside the rules (its tangent is recorded): write it with ops that are
    in them, or add a rule."""
    with torch.random.fork_rng():
        _, plain = saved_by_op(lambda: fn(*primals))
    with torch.random.fork_rng():
        with mode():
            _, one = saved_by_op(lambda: torch.func.jvp(fn, tuple(primals), tuple(tangents)))
    forward, one_pass = sum(plain.values()), sum(one.values())
    extra = {k: v - plain.get(k, 0) for k, v in one.items() if v > plain.get(k, 0)}
    return dict(forward=forward, one_pass=one_pass, ratio=one_pass / max(forward, 1),
                extra=dict(sorted(extra.items(), key=lambda kv: -kv[1])))
