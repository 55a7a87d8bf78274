"""The vectorised MaMe merge step against a literal loop reading of Algorithm 1 (MAME_SPEC.md)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from mame_core.merge import TokenBatch, mame_merge, mame_order


def reference_mame(x, metric, size, tau, num_special, stride=2):
    """Algorithm 1 for one image, as MAME_SPEC.md reads it, written as plain loops (float64)."""
    L = x.shape[0]
    spec = list(range(num_special))
    rest = list(range(num_special, L))
    dst = [rest[p] for p in range(len(rest)) if p % stride == 0]
    src = [rest[p] for p in range(len(rest)) if p % stride != 0]
    M, N = len(dst), len(src)

    def cos(a, b):
        na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
        if na == 0 or nb == 0:
            return 0.0
        return max(-1.0, min(1.0, sum(u * v for u, v in zip(a, b)) / (na * nb)))

    K = metric.tolist()
    St = [[max(cos(K[dst[i]], K[src[j]]) - tau, 0.0) for j in range(N)] for i in range(M)]
    WF = [[0.0] * N for _ in range(M)]
    for j in range(N):
        colsum = sum(St[i][j] for i in range(M))
        count = sum(1 for i in range(M) if St[i][j] > 0)
        kept = [St[i][j] if St[i][j] > 0 and St[i][j] * count >= colsum * (1 - 1e-5) else 0.0
                for i in range(M)]
        total = sum(kept)
        for i in range(M):
            WF[i][j] = kept[i] / total if total > 0 else 0.0
    preserved = [src[j] for j in range(N) if sum(WF[i][j] for i in range(M)) == 0]

    X, s = x.tolist(), size.tolist()
    out_x, out_s = [X[t] for t in spec], [s[t] for t in spec]
    for i in range(M):
        new_size = s[dst[i]]
        acc = [s[dst[i]] * v for v in X[dst[i]]]
        for j in range(N):
            mass = WF[i][j] * s[src[j]]
            new_size += mass
            acc = [a + mass * v for a, v in zip(acc, X[src[j]])]
        out_x.append([a / new_size for a in acc])
        out_s.append(new_size)
    for t in preserved:
        out_x.append(X[t])
        out_s.append(s[t])
    return torch.tensor(out_x, dtype=torch.float64), torch.tensor(out_s, dtype=torch.float64)


def clustered_tokens(gen, length, dim, n_clusters=3, noise=0.3):
    """Tokens around a few directions, so that thresholds across [-0.2, 1] really merge some of them."""
    centres = torch.randn(n_clusters, dim, generator=gen, dtype=torch.float64)
    which = torch.randint(0, n_clusters, (length,), generator=gen)
    return centres[which] + noise * torch.randn(length, dim, generator=gen, dtype=torch.float64)


def padded_batch(images, fill=float("nan")):
    """Stack per-image (x, metric, size) with different lengths; padding rows hold `fill`, size 0."""
    longest = max(x.shape[0] for x, _, _ in images)
    xs, ms, ss = [], [], []
    for x, m, s in images:
        pad = longest - x.shape[0]
        xs.append(torch.cat([x, torch.full((pad, x.shape[1]), fill, dtype=x.dtype)]))
        ms.append(torch.cat([m, torch.full((pad, m.shape[1]), fill, dtype=m.dtype)]))
        ss.append(torch.cat([s, torch.zeros(pad, dtype=s.dtype)]))
    return torch.stack(xs), torch.stack(ms), torch.stack(ss)


@pytest.mark.parametrize("seed", range(40))
def test_vectorised_matches_loop_reference(seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_special = rng.choice([0, 0, 1, 2, 5])
    stride = rng.choice([2, 2, 3])
    dim, key_dim = rng.randint(2, 9), rng.randint(2, 6)
    images, taus = [], []
    for _ in range(rng.randint(1, 4)):
        length = num_special + rng.randint(1, 30)
        x = torch.randn(length, dim, generator=gen, dtype=torch.float64)
        metric = clustered_tokens(gen, length, key_dim)
        size = (torch.randint(1, 4, (length,), generator=gen).double() if rng.random() < 0.5
                else torch.ones(length).double())
        images.append((x, metric, size))
        taus.append(rng.uniform(-0.2, 1.05))

    x, metric, size = padded_batch(images)
    out, lengths = mame_merge(TokenBatch(x, size), metric, torch.tensor(taus, dtype=torch.float64),
                              num_special, stride)
    assert torch.isfinite(out.x).all() and torch.isfinite(out.size).all()
    for b, ((xi, mi, si), tau) in enumerate(zip(images, taus)):
        ref_x, ref_s = reference_mame(xi, mi, si, tau, num_special, stride)
        n = int(lengths[b])
        assert n == ref_x.shape[0]
        torch.testing.assert_close(out.x[b, :n], ref_x, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.size[b, :n], ref_s, atol=1e-5, rtol=0)
        assert (out.size[b, n:] == 0).all() and (out.x[b, n:] == 0).all()


def test_float32_matches_loop_reference():
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(33, 16, generator=gen, dtype=torch.float64)
    metric = clustered_tokens(gen, 33, 8)
    size = torch.ones(33, dtype=torch.float64)
    out, _lengths = mame_merge(TokenBatch(x[None].float(), size[None].float()), metric[None].float(),
                               torch.tensor([0.6]), 1)
    ref_x, ref_s = reference_mame(x, metric, size, 0.6, 1)
    assert ref_x.shape[0] < 33, "the case must merge something"
    torch.testing.assert_close(out.x[0].double(), ref_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.size[0].double(), ref_s, atol=1e-5, rtol=0)


def test_size_is_conserved_and_special_tokens_untouched():
    gen = torch.Generator().manual_seed(3)
    images = [(torch.randn(n, 6, generator=gen), clustered_tokens(gen, n, 4).float(),
               torch.rand(n, generator=gen) + 0.5)
              for n in (40, 17, 29)]
    x, metric, size = padded_batch(images)
    batch, lengths = mame_merge(TokenBatch(x, size), metric, torch.tensor([0.5, 0.7, 0.2]), num_special=2)
    assert (lengths < torch.tensor([40, 17, 29])).all()
    torch.testing.assert_close(batch.size.sum(dim=1), torch.nan_to_num(size).sum(dim=1), atol=1e-4, rtol=0)
    assert torch.equal(batch.x[:, :2], x[:, :2]) and torch.equal(batch.size[:, :2], size[:, :2])


def test_tau_one_merges_nothing_even_for_identical_keys():
    metric = torch.ones(1, 9, 4)  # cosine rounds to 1.0000001 without the clamp
    x = torch.randn(1, 9, 3)
    batch, lengths = mame_merge(TokenBatch(x, torch.ones(1, 9)), metric, torch.tensor([1.0]), num_special=1)
    assert lengths.tolist() == [9]
    assert torch.equal(batch.size, torch.ones(1, 9))
    # Order: special, destinations (even positions), preserved sources (odd positions).
    order = [0, 1, 3, 5, 7, 2, 4, 6, 8]
    assert torch.equal(batch.x, x[:, order])


def test_identical_keys_merge_at_any_tau_below_one_with_exact_sizes():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]])
    x = torch.tensor([[[1.0], [3.0], [10.0], [20.0]]])
    batch, lengths = mame_merge(TokenBatch(x, torch.ones(1, 4)), metric, torch.tensor([0.999]), num_special=0)
    assert lengths.tolist() == [2]
    # No eps anywhere: a single candidate gets weight exactly 1, so sizes are exactly 2.
    assert batch.size.tolist() == [[2.0, 2.0]]
    assert batch.x[0, :, 0].tolist() == [2.0, 15.0]


def test_similarity_just_above_tau_still_gives_whole_sizes():
    # Spec step 4: with an eps the weights of a barely merging src shift by whole percents.
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([math.cos(0.01), math.sin(0.01)])
    metric = torch.stack([a, b])[None]
    tau = torch.tensor([float(a @ b) - 1e-6])
    batch, lengths = mame_merge(TokenBatch(torch.randn(1, 2, 3), torch.ones(1, 2)), metric, tau,
                                num_special=0)
    assert lengths.tolist() == [1]
    assert batch.size[0, 0].item() == 2.0


def test_never_merges_into_special_tokens_and_zero_keys_give_no_nan():
    metric = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    x = torch.arange(5.0).view(1, 5, 1)
    batch, lengths = mame_merge(TokenBatch(x, torch.ones(1, 5)), metric, torch.tensor([0.5]), num_special=1)
    assert batch.x[0, 0, 0].item() == 0.0 and batch.size[0, 0].item() == 1.0
    assert torch.isfinite(batch.x).all()
    # Non-special tokens: dst 1 and 3, src 2 and 4. src 2 (key [1,0]) joins dst 1; src 4 (zero key) stays.
    assert lengths.tolist() == [4]
    assert batch.size[0].tolist() == [1.0, 2.0, 1.0, 1.0]


def test_padding_with_nan_gives_finite_output_and_is_never_a_candidate():
    gen = torch.Generator().manual_seed(11)
    # Identical keys: merges fully.
    short = (torch.randn(5, 4, generator=gen), torch.ones(5, 3), torch.ones(5))
    long = (torch.randn(12, 4, generator=gen), torch.ones(12, 3), torch.ones(12))
    x, metric, size = padded_batch([short, long])
    batch, lengths = mame_merge(TokenBatch(x, size), metric, torch.tensor([0.5, 0.5]), num_special=1)
    assert torch.isfinite(batch.x).all()
    assert lengths.tolist() == [1 + 2, 1 + 6]
    assert batch.size[0].sum().item() == pytest.approx(5.0)


def test_lower_tau_never_keeps_more_tokens_in_one_step():
    gen = torch.Generator().manual_seed(5)
    metric = clustered_tokens(gen, 60, 6).float()[None].expand(8, -1, -1)
    x = torch.randn(8, 60, 5, generator=gen)
    taus = torch.linspace(1.0, -0.2, 8)
    _, lengths = mame_merge(TokenBatch(x, torch.ones(8, 60)), metric, taus, num_special=1)
    assert all(a >= b for a, b in zip(lengths.tolist(), lengths.tolist()[1:]))
    assert lengths[0] > lengths[-1]


def test_source_map_tracks_every_patch_once():
    gen = torch.Generator().manual_seed(2)
    n = 21
    metric = clustered_tokens(gen, n, 4).float()[None]
    source = torch.eye(n)[None]
    batch, lengths = mame_merge(TokenBatch(torch.randn(1, n, 3), torch.ones(1, n), source), metric,
                                torch.tensor([0.4]), 0)
    assert lengths.item() < n
    torch.testing.assert_close(batch.source.sum(dim=1), torch.ones(1, n))
    torch.testing.assert_close(batch.source.sum(dim=2), batch.size)


def test_reorder_path_equals_merge_at_tau_one():
    gen = torch.Generator().manual_seed(4)
    x, metric = torch.randn(3, 14, 5, generator=gen), torch.randn(3, 14, 4, generator=gen)
    source = torch.eye(14).expand(3, -1, -1)
    for special, stride in [(0, 2), (1, 2), (3, 3)]:
        batch = TokenBatch(x, torch.ones(3, 14), source)
        merged, _ = mame_merge(batch, metric, torch.ones(3), special, stride)
        ordered = mame_order(batch, special, stride)
        assert torch.equal(merged.x, ordered.x) and torch.equal(merged.size, ordered.size)
        assert torch.equal(merged.source, ordered.source)


def test_fp16_fusion_of_big_tokens_does_not_overflow():
    # Tokens of 1000 that each stand for 40 patches: size x value (40,000, then 80,000 once fused) passes
    # fp16's 65,504, the size-weighted mean (1000) does not. The weights must be normalised before the
    # product.
    x = torch.full((1, 9, 4), 1000.0, dtype=torch.float16)
    size = torch.full((1, 9), 40.0)
    size[0, 0] = 1
    metric = torch.ones(1, 9, 8, dtype=torch.float16)
    out, _ = mame_merge(TokenBatch(x, size), metric, 0.5, num_special=1)
    assert out.size.sum().item() == size.sum().item()
    assert torch.equal(out.x, torch.full_like(out.x, 1000.0))
