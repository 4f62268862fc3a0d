"""Derived randomness, JAX ``fold_in`` style.

Nothing random is stored in the training state. Every random stream is a pure function of
``(seed, step, rank, purpose)``: ``make_generator`` hashes them into a fresh ``torch.Generator``. Resuming
therefore needs only ``step``, data-parallel ranks draw distinct noise, and two purposes (say ``"noise"``
and ``"timesteps"``) never share a stream.

The hash is BLAKE2b over a length-prefixed, type-tagged encoding of the keys, so a derived seed is the
same in every process, Python run and platform (Python's ``hash`` is salted per process and is not used).
"""

import hashlib

import torch

__all__ = ["fold_in", "make_generator", "sample_keys"]

_PERSON = b"ltxf.fold_in"  # BLAKE2b personalisation: domain separation from any other use of the hash
_SEED_BITS = 63  # keeps derived seeds valid for torch, numpy and anything else that wants a signed int64


def _encode(key: int | str) -> bytes:
    # bool is an int subclass; True and 1 would collide silently, so refuse it.
    if isinstance(key, bool) or not isinstance(key, int | str):
        raise ValueError(f"fold_in keys must be int or str, got {type(key).__name__} {key!r}")
    tag, payload = (b"i", str(key).encode("ascii")) if isinstance(key, int) else (b"s", key.encode("utf-8"))
    return tag + len(payload).to_bytes(8, "little") + payload


def _fold_in_one(seed: int, key: int | str) -> int:
    digest = hashlib.blake2b(_encode(seed) + _encode(key), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "little") >> (64 - _SEED_BITS)


def fold_in(seed: int, *keys: int | str) -> int:
    """Derive a new seed from ``seed`` and ``keys`` (ints or strings), one key at a time.

    ``fold_in(s, a, b) == fold_in(fold_in(s, a), b)``, as with repeated ``jax.random.fold_in``. The result
    is a non-negative int below 2**63, stable across processes and Python runs. Pure.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"fold_in seed must be an int, got {type(seed).__name__} {seed!r}")
    for key in keys:
        seed = _fold_in_one(seed, key)
    return seed


def make_generator(
    seed: int, step: int, rank: int, purpose: str, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``fold_in(seed, step, rank, purpose)``.

    Same arguments give the same stream; changing any of ``step``, ``rank`` (the data-parallel rank) or
    ``purpose`` gives an unrelated one. The generator is new on every call, so no RNG state leaks between
    steps and nothing needs checkpointing.
    """
    generator = torch.Generator(device=device)
    generator.manual_seed(fold_in(seed, step, rank, purpose))
    return generator


def sample_keys(seed: int, step: int, first_index: int, batch_size: int) -> torch.Tensor:
    """The explicit randomness of one micro-batch: int64 [batch_size], entry j the derived seed
    ``fold_in(seed, step, first_index + j, "sample")`` of the sample at global index ``first_index + j`` of this
    step's global batch. ``torch.Generator().manual_seed(key[j])`` is the stream ``make_generator(seed, step,
    first_index + j, "sample")``, so a sample's draws do not depend on which process or micro-batch holds it."""
    return torch.tensor([fold_in(seed, step, first_index + j, "sample") for j in range(batch_size)],
                        dtype=torch.int64)
