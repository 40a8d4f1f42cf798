"""Exact distribution tests: enumerate autoregressive probabilities of short continuations and G-test samples."""

import torch

from minipass.sampling import logits_to_probs


@torch.no_grad()
def continuation_probs(model, prompt, n, temperature, top_k=0, top_p=1.0):
    """Exact probability (V**n,) of every n-token continuation of `prompt` under autoregressive sampling.

    Continuation (x_1..x_n) has index sum(x_i * V**(n-i)). Computed by batching all V**(i-1) prefixes per step.
    """
    V = model.args.vocab_size
    seqs = torch.cartesian_prod(*[torch.arange(V)] * n).reshape(-1, n)  # (V**n, n)
    probs = torch.ones(V ** n)
    for i in range(n):
        x = torch.cat([torch.tensor(prompt).expand(len(seqs), -1), seqs[:, :i]], 1)
        model.setup_caches(len(seqs), x.shape[1])
        logits = model(x, input_pos=torch.arange(x.shape[1]).expand(len(seqs), -1),
                       cache_seqlens=torch.zeros(len(seqs), dtype=torch.long),
                       logits_index=torch.full((len(seqs), 1), x.shape[1] - 1))[:, 0]
        p = logits_to_probs(logits, temperature, top_k, top_p)
        probs *= p.gather(1, seqs[:, i:i + 1])[:, 0]
    return probs


def counts_of(outputs, V, n):
    idx = torch.zeros(len(outputs), dtype=torch.long)
    for i in range(n):
        idx = idx * V + torch.tensor([o[i] for o in outputs])
    return torch.bincount(idx, minlength=V ** n).double()


def g_test(counts, probs, min_expected=5.0):
    """p-value of a G-test of `counts` against `probs`; cells expected below `min_expected` are pooled.

    Returns (p_value, observed count in zero-probability cells).
    """
    counts, probs = counts.double(), probs.double()
    impossible = counts[probs <= 0].sum().item()
    expected = probs / probs.sum() * counts.sum()
    big = expected >= min_expected
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    g = 2 * torch.where(obs > 0, obs * torch.log(obs / exp), torch.zeros_like(obs)).sum()
    df = len(obs) - 1
    p = torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), g / 2).item()
    return p, impossible
