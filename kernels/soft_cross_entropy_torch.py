"""smoothce::soft_cross_entropy in torch ops: the CPU path (and SMOOTHCE_KERNEL=torch anywhere).

Same contract and math as the Triton launcher (kernels/soft_cross_entropy_triton.py); the terms
and their per-row coefficients are kernels/soft_inputs.py's. For a block of rows, with x the
student's logits (after logit_scale and softcap), s = soft_logit_scale x, p = softmax(x),
p^s = softmax(s), the target distribution q (log q: log of the probabilities, the log-probs
themselves, or target_logit_scale u - logsumexp for a teacher's logits u), and (alpha, beta) the
target's label smoothing:

    F = (alpha sum_j w_j q_j + beta W) lse(s) - alpha sum_j w_j q_j s_j - beta sum_j w_j s_j
        + kl sum_j q_j log q_j
    R = sum_j p^s_j (s_j - lse(s) - log q_j)

and the gradient with respect to x, since d lse / dx = p:

    dx_j = (k_y + k_yb + k_u W + 2 k_z lse) p_j - k_y [j = y] - k_yb [j = yb] - k_u w_j
           + sigma (k_f (alpha sum_k w_k q_k + beta W) p^s_j - k_f w_j (alpha q_j + beta)
                    + k_r p^s_j (s_j - lse(s) - log q_j - R))

with sigma = soft_logit_scale (R's derivative: d/ds_j sum_k p_k v_k = p_j (v_j - E[v]) + p_j, and
d lse / ds_j = p_j, for v = s - log q), times logit_scale and 1 - tanh^2 under a softcap.
0 log 0 = 0 in the probabilities' entropy, as xlogy; every other product is as eager computes it
(a probability of 0 against a logit of -inf is nan there and here).

How, on a CPU: every softmax is ATen's fused one, which reads a row once and writes p, and a
logsumexp comes from it for free, lse = max_j x_j - log max_j p_j (two cheap reductions; max p >=
1 / V never underflows), where torch.logsumexp would cost three times a softmax. Sums over a row
are a product into a work buffer and a sum, or a matrix-vector product with the class weights;
the gradient is built in place in the gradient buffer. Nothing takes an elementwise log unless
the math needs log q of probabilities (their entropy, the reverse KL). Rows go in blocks of a
bounded number of elements, each with a few work buffers allocated once per call.
"""

from __future__ import annotations

from typing import Optional

import torch

from smoothce.kernels.inputs import acc_dtype
from smoothce.kernels.soft_inputs import S_LSE, S_LSE_SOFT, S_LSE_TARGET, S_MASS, S_REVERSE, Terms

# Rows per block: about this many elements (32 MiB per fp32 buffer).
_BLOCK_ELEMENTS = 1 << 23


def torch_soft_cross_entropy(x3, t3, ya, yb, coef, weight, loss_rows, grad3, stats, *, terms: Terms,
                             from_stats: bool = False):
    """Fills loss_rows (N * S,) and grad3 (N, C, S) when given, from x3 (N, C, S), the target t3
    (N, C, S) or None, labels ya / yb (N, S) or None and the coefficients coef (N * S, 6).

    stats (N * S, 5): written when given, or read (``from_stats``: a gradient computed in
    backward, whose coefficients already carry grad_output; loss_rows is then None).
    """
    N, C, S = x3.shape
    acc = acc_dtype(x3.dtype)
    flat = S == 1  # (N, C) blocks: reductions over a trailing size-1 dim take a slow strided path
    w = None if weight is None else weight.to(acc)
    w_sum = float(C) if weight is None else w.sum()
    if w is not None:
        w = w.view((1, C) if flat else (1, C, 1))
    step = max(1, _BLOCK_ELEMENTS // max(C * S, 1))
    buffers = _Buffers((min(step, N), C) if flat else (min(step, N), C, S), acc, x3.device)
    for n0 in range(0, N, step):
        n1 = min(N, n0 + step)
        r0, r1 = n0 * S, n1 * S
        shape = (n1 - n0, 1) if flat else (n1 - n0, 1, S)
        per_row = lambda v: v[r0:r1].reshape(shape)  # noqa: E731
        block = _Block(
            x=x3[n0:n1, :, 0] if flat else x3[n0:n1],
            t=None if t3 is None else t3[n0:n1, :, 0] if flat else t3[n0:n1],
            grad=None if grad3 is None else grad3[n0:n1, :, 0] if flat else grad3[n0:n1],
            k=[per_row(coef[:, j]) for j in range(coef.shape[1])],
            y=None if ya is None else per_row(ya.reshape(-1)).clamp(0, C - 1).long(),
            yb=None if yb is None else per_row(yb.reshape(-1)).clamp(0, C - 1).long(),
            stats=[per_row(stats[:, j]) for j in range(stats.shape[1])] if from_stats else None,
            w=w, w_sum=w_sum, terms=terms, acc=acc, buffers=buffers.rows(n1 - n0))
        loss, st = block.run()
        if loss_rows is not None:
            loss_rows[r0:r1] = loss.reshape(-1)
        if stats is not None and not from_stats:
            for j, v in enumerate(st):
                stats[r0:r1, j] = v.reshape(-1)


class _Buffers:
    """Work buffers of one block's shape, allocated on first use and reused by every block."""

    def __init__(self, shape, acc, device):
        self.shape, self.acc, self.device, self.made = shape, acc, device, {}

    def rows(self, n: int) -> "_Buffers":
        view = _Buffers(self.shape, self.acc, self.device)
        view.made = self.made
        view.n = n
        return view

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.made:
            self.made[name] = torch.empty(self.shape, dtype=self.acc, device=self.device)
        return self.made[name][: self.n]


def _softmax_into(src, out, scale: float, top=None):
    """out = softmax(scale * src) over dim 1 (out may be src), its logsumexp, and src's (max,
    argmax) per row, which a second softmax of the same src at another scale reuses.

    lse = scale max_j src_j - log p_argmax: the largest probability is at least 1 / V, so its log
    never underflows, and this costs one reduction where torch.logsumexp costs about three softmaxes.
    """
    if top is None:
        top = src.max(1, keepdim=True)
    m, at = top
    if scale != 1.0:
        torch.mul(src, scale, out=out)
        src = out
    torch.softmax(src, 1, dtype=out.dtype, out=out)
    return out, m.to(out.dtype) * scale - out.gather(1, at).log(), top


class _Block:
    """One block of rows: its loss terms and, in place in its gradient, the gradient."""

    def __init__(self, x, t, grad, k, y, yb, stats, w, w_sum, terms: Terms, acc, buffers: _Buffers):
        self.t, self.grad, self.y, self.yb, self.stats = t, grad, y, yb, stats
        self.k_y, self.k_yb, self.k_u, self.k_z, self.k_f, self.k_r = k
        self.w, self.w_sum, self.terms, self.acc, self.buf = w, w_sum, terms, acc, buffers
        # The student's logits after logit_scale and softcap, in acc (x itself when nothing changes).
        if x.dtype == acc and terms.logit_scale == 1.0 and terms.softcap is None:
            self.x = x
        else:
            self.x = torch.mul(x, terms.logit_scale, out=buffers["x"])
            if terms.softcap is not None:
                self.x.div_(terms.softcap).tanh_().mul_(terms.softcap)

    # -- row sums ---------------------------------------------------------------------------

    def _wsum(self, v):
        """sum_j w_j v_j per row (a matrix-vector product: v is read once, no product buffer)."""
        if self.w is None:
            return v.sum(1, keepdim=True)
        if v.dim() == 2:
            return torch.mv(v, self.w.view(-1)).unsqueeze(1)
        return torch.einsum("ncs,c->ns", v, self.w.view(-1)).unsqueeze(1)

    def _dot(self, a, b, weighted=False):
        """sum_j (w_j) a_j b_j per row, through the product buffer."""
        prod = torch.mul(a, b, out=self.buf["prod"])
        return self._wsum(prod) if weighted else prod.sum(1, keepdim=True)

    # -- the distributions --------------------------------------------------------------------

    def _target(self, lse_t=None):
        """(q, lse_t or None): q a buffer we may overwrite, or the user's probabilities."""
        t, terms = self.t, self.terms
        if terms.target_kind == "probs":
            return (t if t.dtype == self.acc else self.buf["q"].copy_(t)), None
        if terms.target_kind == "log_probs":
            return torch.exp(t, out=self.buf["q"]), None
        q, lse, _ = _softmax_into(t, self.buf["q"], terms.target_logit_scale)
        return q, lse

    def _log_q_rows(self, q, lse_t, p):
        """sum_j p_j log q_j per row: entropy for p = q (0 log 0 = 0), else against p."""
        terms, t = self.terms, self.t
        if terms.target_kind == "probs":
            log_q = torch.log(q, out=self.buf["prod"])
            log_q.mul_(p)
            if p is q:
                log_q.masked_fill_(q == 0, 0.0)  # xlogy's 0 log 0 = 0; a negative q stays nan, as in eager
            return log_q.sum(1, keepdim=True)
        dot = self._dot(p, t)
        return dot if terms.target_kind == "log_probs" else terms.target_logit_scale * dot - lse_t

    # -- loss and gradient ------------------------------------------------------------------------

    def run(self):
        terms, x, k_y, k_yb, k_u, k_z, k_f, k_r = (self.terms, self.x, self.k_y, self.k_yb, self.k_u, self.k_z,
                                                   self.k_f, self.k_r)
        sigma, st = terms.soft_logit_scale, self.stats
        zeros = torch.zeros_like(k_y)
        loss, lse, lse_s, mass, rev, lse_t = zeros, zeros, zeros, zeros, zeros, zeros
        compute_grad = self.grad is not None
        g = None
        if compute_grad:
            g = self.grad if self.grad.dtype == self.acc else self.buf["grad"]
        p = ps = q = top = None
        if terms.hard:
            p, lse, top = _softmax_into(x, g if g is not None else self.buf["p"], 1.0)
        if terms.soft:
            if terms.hard and not terms.two_scales:
                ps, lse_s = p, lse
            else:
                ps, lse_s, _ = _softmax_into(x, g if g is not None and not terms.hard else self.buf["ps"], sigma, top)
            q, lse_t = self._target()
            lse_t = zeros if lse_t is None else lse_t
        if st is not None:
            lse, lse_s, mass, rev, lse_t = st[S_LSE], st[S_LSE_SOFT], st[S_MASS], st[S_REVERSE], st[S_LSE_TARGET]
        swx = self._wsum(x) if terms.smoothing_sum and st is None else None
        if st is None:
            if terms.label:
                loss = loss + _term(k_y, lse - x.gather(1, self.y))
                if terms.mixup:
                    loss = loss + _term(k_yb, lse - x.gather(1, self.yb))
            if terms.uniform:
                loss = loss + _term(k_u, self.w_sum * lse - swx)
            if terms.z:
                loss = loss + _term(k_z, lse * lse)
            if terms.forward:
                # a teacher's softmax sums to 1: no pass for it
                mass = self._wsum(q) if terms.target_kind != "logits" or self.w is not None else torch.ones_like(k_f)
                f = (terms.alpha * mass + terms.beta * self.w_sum) * lse_s
                f = f - terms.alpha * sigma * self._dot(q, x, weighted=True)
                if terms.beta:
                    f = f - terms.beta * sigma * swx
                if terms.kl:
                    f = f + self._log_q_rows(q, lse_t, q)
                loss = loss + _term(k_f, f)
            if terms.reverse:
                rev = sigma * self._dot(ps, x) - lse_s - self._log_q_rows(q, lse_t, ps)
                loss = loss + _term(k_r, rev)
        stats = (lse, lse_s, mass, rev, lse_t)
        if compute_grad:
            self._gradient(g, p, ps, q, lse, lse_s, mass, rev, lse_t)
            if g is not self.grad:
                self.grad.copy_(g)
        return loss, stats

    def _gradient(self, g, p, ps, q, lse, lse_s, mass, rev, lse_t):
        """The gradient into g, which holds p (label terms) or p^s (the target's alone)."""
        terms, x, sigma = self.terms, self.x, self.terms.soft_logit_scale
        k_y, k_yb, k_u, k_z, k_f, k_r = self.k_y, self.k_yb, self.k_u, self.k_z, self.k_f, self.k_r
        coef_ps = None  # the coefficient of p^s per row
        rev_part = None
        if terms.soft:
            coef_ps = torch.zeros_like(k_f)
            if terms.forward:
                coef_ps = coef_ps + sigma * k_f * (terms.alpha * mass + terms.beta * self.w_sum)
            if terms.reverse:
                # k_r p^s (s - lse(s) - log q - R): the elementwise p^s (s - log q) apart, the rest per row
                rev_part = self._reverse_elementwise(ps)
                coef_ps = coef_ps - sigma * k_r * (lse_s + rev) + (sigma * k_r * lse_t
                                                                    if terms.target_kind == "logits" else 0.0)
        if terms.hard:
            coef_p = k_y + k_yb + k_u * self.w_sum + 2.0 * k_z * lse
            if ps is p and coef_ps is not None:
                coef_p, coef_ps = coef_p + coef_ps, None
            g.mul_(coef_p)
            if terms.label:
                g.scatter_add_(1, self.y, -k_y)
                if terms.mixup:
                    g.scatter_add_(1, self.yb, -k_yb)
            if terms.uniform:
                g.sub_(k_u) if self.w is None else g.addcmul_(k_u, self.w, value=-1.0)
            if coef_ps is not None:
                g.addcmul_(ps, coef_ps)
        elif coef_ps is not None:
            g.mul_(coef_ps)  # g holds p^s
        if rev_part is not None:
            g.addcmul_(rev_part, sigma * k_r)
        if terms.forward:
            # - sigma k_f w_j (alpha q_j + beta)
            c = -sigma * k_f
            if terms.alpha:
                qw = q if self.w is None else torch.mul(q, self.w, out=self.buf["prod"])
                g.addcmul_(qw, c * terms.alpha)
            if terms.beta:
                g.add_(c * terms.beta) if self.w is None else g.addcmul_(c * terms.beta, self.w)
        if terms.softcap is not None:  # d softcap(u) / du = 1 - (x / cap)^2 at x = softcap(u)
            d = torch.div(x, terms.softcap, out=self.buf["prod"])
            g.mul_(d.square_().neg_().add_(1.0).mul_(terms.logit_scale))
        elif terms.logit_scale != 1.0:
            g.mul_(terms.logit_scale)

    def _reverse_elementwise(self, ps):
        """p^s_j (s_j - log q_j), up to a per-row constant (the teacher's logsumexp for logits)."""
        terms, t = self.terms, self.t
        out = self.buf["rev"]
        if terms.target_kind == "probs":
            torch.log(t, out=out).neg_()
        elif terms.target_kind == "log_probs":
            torch.neg(t, out=out)
        else:
            torch.mul(t, -terms.target_logit_scale, out=out)
        return out.add_(self.x, alpha=terms.soft_logit_scale).mul_(ps)


def _term(k, v):
    """k v, and an exact 0 on rows where the term does not count (k = 0), whatever v is."""
    return torch.where(k == 0.0, 0.0, k * v)


def torch_target_gradient(x3, t3, coef, weight, stats, *, terms: Terms) -> torch.Tensor:
    """d(sum_i coef-weighted loss_i) / d(target) (N, C, S) in acc: the target's gradient when it
    requires grad (backward only, from the saved statistics).

    For probabilities, dF/dq_j = alpha w_j (lse(s) - s_j) + kl (log q_j + 1), written as eager's
    xlogy derivative (xlogy(q != 0, q) + q / q: nan at q = 0, as eager's), and dR/dq_j = -p^s_j / q_j;
    for log-probs d/dt_j = q_j dF/dq_j (the entropy's exp(t) (t + 1)) and dR/dt_j = -p^s_j; for a
    teacher's logits u, with q = softmax(tau u), d/du_k = tau q_k (G_k - sum_j q_j G_j) for G = dF/dq,
    and dR/du_k = -tau (p^s_k - q_k).
    """
    from smoothce.kernels.soft_inputs import K_F, K_R

    N, C, S = x3.shape
    acc = acc_dtype(x3.dtype)
    w = None if weight is None else weight.to(acc).view(1, C, 1)
    k_f = coef[:, K_F].view(N, 1, S)
    k_r = coef[:, K_R].view(N, 1, S)
    st = [stats[:, j].view(N, 1, S) for j in range(stats.shape[1])]
    x = _student(x3, terms, acc)
    s = x * terms.soft_logit_scale
    lse_s = st[S_LSE_SOFT]
    t = t3.to(acc)
    if terms.target_kind == "probs":
        q, log_q = t, t.log()
    elif terms.target_kind == "log_probs":
        q, log_q = t.exp(), t
    else:
        log_q = terms.target_logit_scale * t - st[S_LSE_TARGET]
        q = log_q.exp()
    g = torch.zeros_like(s)
    if terms.forward:
        d_q = terms.alpha * (lse_s - s)
        if w is not None:
            d_q = d_q * w
        if terms.kl:
            if terms.target_kind == "probs":
                d_q = d_q + torch.special.xlogy((q != 0).to(acc), q) + q / q
            else:
                d_q = d_q + log_q + 1.0
        g = k_f * d_q
    p_s = torch.exp(s - lse_s) if terms.reverse else None
    if terms.target_kind == "probs":
        if terms.reverse:
            g = g - k_r * p_s / q
        return g
    if terms.target_kind == "log_probs":
        g = g * q
        if terms.reverse:
            g = g - k_r * p_s
        return g
    tau = terms.target_logit_scale
    g = tau * q * (g - (q * g).sum(1, keepdim=True))
    if terms.reverse:
        g = g - k_r * tau * (p_s - q)
    return g


def _student(x, terms: Terms, acc) -> torch.Tensor:
    """softcap(logit_scale x) in acc."""
    x = x.to(acc) * terms.logit_scale
    return x if terms.softcap is None else terms.softcap * torch.tanh(x / terms.softcap)
