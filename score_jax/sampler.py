"""SCoRe's rollout: N-turn sampling in one jit-compiled program over one KV cache.

    y1 ~ pi(. | x1);   x2 = x1 + y1 + p;   y2 ~ pi(. | x2);   ...   (``num_turns`` attempts)

One call of a ``Sampler`` runs, inside a single ``jax.jit`` program:

1. Prefill: the B prompts (right-padded to ``max_prompt_len``) go through the model once.
2. k samples per prompt: each prompt's cache rows and next-token logits are replicated
   ``samples_per_prompt`` times (R = B * k rows; row ``b * k + j`` is sample j of prompt b),
   so the prefill work is done once per prompt, not once per sample.
3. Turn t: up to ``max_new_tokens`` tokens are decoded in ``lax.while_loop``s; a row stops
   after emitting one of ``stop_token_ids`` (the stop token is part of the turn), the loop
   exits as soon as every row has stopped.
4. Between turns the instruction ids are written into the same cache right after each row's
   own last token (its stop token, or its last token if it hit the length limit), and the
   next turn decodes. Earlier turns are never run through the model again.

The instruction is passed already rendered with the chat template's turn markers, and the
sampler appends exactly those ids. With the toy template (score_jax.prompts), if ``<eot>``
is a stop token the model's answer already ends with it, so the instruction is
``<user>{correction}<eot><model>``; if not, start it with ``<eot>`` to close the answer.

Positions: row r's episode is contiguous in positions: its prompt at [0, len), turn 0 at
[len, len + n0), the instruction after it, turn 1 right after, and so on; ``start`` in each
turn's results is the position of that turn's first token. ``pack_episodes`` (jit:
``Sampler.pack``) lays the episodes out as [R, T] token arrays in exactly these positions, with
the learner's batch keys, for the learner to re-score.

Cache layout: a chunked cache (``model.Transformer.decode``) with static slots: the prompt
chunk (``max_prompt_len`` slots), each turn's ``max_new_tokens`` slots split into chunks of
``chunk_len``, and an instruction chunk between turns. Rows that stop early leave empty slots
(position -1) that attention masks out. Each decode loop attends only to the chunks up to the
one it writes, so early steps do not read the empty end of the cache.

Shapes are static from the configs (no recompilation for new data); the KV cache lives in
buffers the Sampler owns, donated to each call and updated in place.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from score_jax import losses, model, sharding


def _local_values(x) -> np.ndarray:
    """The values of ``x`` this process holds, flattened (all of them when it is process-local):
    what the input checks read; a multi-process array cannot be read whole on one host."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x).ravel()
    return np.concatenate([np.asarray(s.data).ravel() for s in x.addressable_shards])


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static shapes and sampling knobs of one sampler program."""

    max_prompt_len: int  # P: prompts are right-padded to this
    max_new_tokens: int  # N: per turn
    temperature: float  # 0 = greedy
    chunk_len: int  # cache slots per decode chunk (see the module docstring); 0 = one chunk per turn
    instruction_len: int = 0  # I: length of the (rendered) instruction between turns
    num_turns: int = 2  # attempts; each after the same instruction
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    samples_per_prompt: int = 1  # k: rows per prompt (leave-one-out baselines)
    stop_token_ids: tuple[int, ...] = ()  # a row's turn ends after emitting one of these
    pad_id: int = 0  # written after a row's last token
    cache_dtype: str = ""  # "" = the model's compute dtype

    def __post_init__(self):
        for name in ("max_prompt_len", "max_new_tokens", "num_turns", "samples_per_prompt"):
            if getattr(self, name) < 1:
                raise ValueError(f"SamplerConfig.{name}={getattr(self, name)} must be at least 1.")
        if self.num_turns > 1 and self.instruction_len < 1:
            raise ValueError(f"num_turns={self.num_turns} needs instruction_len >= 1 (the instruction between turns).")
        if self.instruction_len < 0 or self.chunk_len < 0 or self.top_k < 0:
            raise ValueError("instruction_len, chunk_len and top_k must not be negative.")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy).")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1].")
        if not isinstance(self.stop_token_ids, tuple):
            raise ValueError("stop_token_ids must be a tuple of ints (the config is hashable).")

    def turn_chunks(self) -> list[tuple[int, int]]:
        """[(first step, end step)] of each decode chunk of one turn."""
        c = self.chunk_len or self.max_new_tokens
        return [(s, min(s + c, self.max_new_tokens)) for s in range(0, self.max_new_tokens, c)]

    def episode_len(self) -> int:
        """Positions an episode can span: P + num_turns * N + (num_turns - 1) * I."""
        return (self.max_prompt_len + self.num_turns * self.max_new_tokens
                + (self.num_turns - 1) * self.instruction_len)


def _layout(cfg: SamplerConfig) -> list[tuple[str, int, int]]:
    """The cache chunks in slot order: (kind, turn, slots). Chunk 0 is the prompt."""
    chunks = [("prompt", -1, cfg.max_prompt_len)]
    for t in range(cfg.num_turns):
        chunks += [("turn", t, end - start) for start, end in cfg.turn_chunks()]
        if t < cfg.num_turns - 1:
            chunks.append(("instruction", t, cfg.instruction_len))
    return chunks


# ----------------------------------------------------------------------------- sampling


def sample_tokens(cfg: SamplerConfig, logits: jax.Array, key: jax.Array) -> jax.Array:
    """Next tokens [R] from policy logits [R,V] f32: greedy, or temperature, then top-k, then
    top-p (each optional), then a categorical draw with ``key``."""
    if cfg.temperature == 0:
        return _argmax(logits)
    x = logits / cfg.temperature
    if cfg.top_k:
        kth = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]  # [R,1]
        x = jnp.where(x < kth, -jnp.inf, x)
    if cfg.top_p < 1.0:
        probs = jax.nn.softmax(x, axis=-1)
        desc = -jnp.sort(-probs, axis=-1)
        before = jnp.cumsum(desc, axis=-1) - desc  # mass of strictly more probable tokens
        # The nucleus: the most probable tokens until their mass reaches top_p (the first
        # one always kept); its least probable member is the threshold.
        threshold = jnp.min(jnp.where(before < cfg.top_p, desc, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(probs < threshold, -jnp.inf, x)
    return _categorical(key, x)


# XLA:CPU's argmax (a variadic reduce) and jax.random.categorical (Gumbel noise for every
# vocabulary entry) cost 5 ms and 55 ms per step at 64 x 32k logits; the blocked versions
# below cost 0.6 ms and 1.6 ms. Blocks of the vocabulary:
_BLOCK = 128


def _blocks(x: jax.Array, fill: float) -> jax.Array:
    """[R,V] -> [R, V/C, C] (padded with ``fill``), C = min(V, _BLOCK)."""
    R, V = x.shape
    C = min(V, _BLOCK)
    nb = -(-V // C)
    return jnp.pad(x, ((0, 0), (0, nb * C - V)), constant_values=fill).reshape(R, nb, C)


def _first_index(mask: jax.Array) -> jax.Array:
    """Index of the first True along the last axis (its size if none)."""
    n = mask.shape[-1]
    return jnp.min(jnp.where(mask, jnp.arange(n, dtype=jnp.int32), n), axis=-1)


def _argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax(x, -1) for [R,V] (the first maximum), via block maxima."""
    xb = _blocks(x, -jnp.inf)  # [R,nb,C]
    block_max = jnp.max(xb, axis=-1)  # [R,nb]
    best = jnp.max(block_max, axis=-1, keepdims=True)  # [R,1]
    b = _first_index(block_max == best)  # [R]
    inside = jnp.take_along_axis(xb, b[:, None, None], axis=1)[:, 0]  # [R,C]
    return jnp.minimum(b * xb.shape[-1] + _first_index(inside == best), x.shape[-1] - 1)  # (NaN rows)


def _categorical(key: jax.Array, x: jax.Array) -> jax.Array:
    """One draw per row from softmax(x) [R,V] (-inf = never), by inverting the CDF with one
    uniform per row: first the block, then the token inside it."""
    xb = _blocks(x, -jnp.inf)
    R, nb, C = xb.shape
    p = jnp.exp(xb - jnp.max(xb, axis=(1, 2), keepdims=True))  # [R,nb,C] unnormalised
    mass = jnp.sum(p, axis=-1)  # [R,nb]
    cum = jnp.cumsum(mass, axis=-1)
    u = jax.random.uniform(key, (R,)) * cum[:, -1]  # [R]
    # The first block whose cumulative mass exceeds u; rounding could point past the last
    # block with any mass, hence the clamp (same for tokens below).
    last_block = jnp.max(jnp.where(mass > 0, jnp.arange(nb), 0), axis=-1)
    b = jnp.minimum(jnp.sum(cum <= u[:, None], axis=-1), last_block)
    u = u - (jnp.take_along_axis(cum, b[:, None], 1) - jnp.take_along_axis(mass, b[:, None], 1))[:, 0]
    inside = jnp.take_along_axis(p, b[:, None, None], axis=1)[:, 0]  # [R,C]
    last = jnp.max(jnp.where(inside > 0, jnp.arange(C), 0), axis=-1)
    i = jnp.minimum(jnp.sum(jnp.cumsum(inside, axis=-1) <= u[:, None], axis=-1), last)
    return (b * C + i).astype(jnp.int32)


# ----------------------------------------------------------------------------- the program


class Sampler:
    """The jit-compiled rollout for one (model config, sampler config, mesh, batch).

    ``sampler(params, prompts, prompt_lens, instruction, key)`` with
      prompts [B, max_prompt_len] int (right-padded), prompt_lens [B] int in [1, max_prompt_len],
      instruction [instruction_len] int (the same for every row), key a ``jax.random.key``;
    returns a dict of device arrays (R = B * samples_per_prompt rows, N = max_new_tokens):
      "turns": one dict per turn:
          "tokens" [R,N] int32 (pad_id after the row's last token),
          "logprobs" [R,N] f32: log pi(token | context) under the policy at temperature 1
              (log-softmax of the raw logits, before temperature, top-k and top-p, whatever
              the sampling temperature: the quantity the learner's REINFORCE and KL terms
              use), 0 after the row's last token,
          "mask" [R,N] bool (the row's tokens), "lengths" [R] int32 (stop token included),
          "truncated" [R] bool (hit max_new_tokens without a stop token),
          "start" [R] int32 (position of the turn's first token; token i is at start + i);
      "prompt_lens" [R] int32; "steps" [num_turns] int32 (decode steps run: < N after an
      early exit).
    The same key and inputs give the same samples, on any mesh.
    """

    def __init__(self, model_cfg: model.ModelConfig, cfg: SamplerConfig, mesh: Mesh, batch: int,
                 compiler_options: dict | None = None):
        if batch < 1:
            raise ValueError(f"batch={batch} must be at least 1.")
        if any(not 0 <= t < model_cfg.vocab_size for t in cfg.stop_token_ids):
            raise ValueError(f"stop_token_ids {cfg.stop_token_ids} must be ids below vocab_size={model_cfg.vocab_size}.")
        self.model_cfg, self.cfg, self.mesh, self.batch = model_cfg, cfg, mesh, batch
        self.rows = batch * cfg.samples_per_prompt
        self.layout = _layout(cfg)
        named = lambda names, shape: sharding.named(mesh, names, shape)  # noqa: E731
        B, R, N, P, I = batch, self.rows, cfg.max_new_tokens, cfg.max_prompt_len, cfg.instruction_len
        self._cache_shapes = self._shapes()
        self.cache_shardings = jax.tree.map(lambda s: named(model.CHUNK_AXES, s.shape), self._cache_shapes)
        turn = {"tokens": named(("batch", None), (R, N)), "logprobs": named(("batch", None), (R, N)),
                "mask": named(("batch", None), (R, N)), **{k: named(("batch",), (R,)) for k in
                                                           ("lengths", "truncated", "start")}}
        out = {"turns": (turn,) * cfg.num_turns, "prompt_lens": named(("batch",), (R,)),
               "steps": sharding.replicated(mesh)}
        in_shardings = (model.param_shardings(model_cfg, mesh), named(("batch", None), (B, P)),
                        named(("batch",), (B,)), named((None,), (I,)), sharding.replicated(mesh),
                        self.cache_shardings)
        self.jitted = jax.jit(self._program, in_shardings=in_shardings, out_shardings=(out, self.cache_shardings),
                              donate_argnums=5, compiler_options=compiler_options)
        self._run = sharding.on_mesh(mesh, self.jitted)
        self._cache = None
        packed = {k: sharding.batch_sharding(mesh, ndim) for k, ndim in _episode_ndims(cfg).items()}
        self._pack = sharding.on_mesh(mesh, jax.jit(functools.partial(pack_episodes, cfg), out_shardings=packed))

    # -- public

    def __call__(self, params: dict, prompts, prompt_lens, instruction, key: jax.Array) -> dict:
        cfg = self.cfg
        prompts, prompt_lens, instruction = (jnp.asarray(a, jnp.int32) for a in (prompts, prompt_lens, instruction))
        if prompts.shape != (self.batch, cfg.max_prompt_len):
            raise ValueError(f"prompts have shape {prompts.shape}; this sampler takes "
                             f"{(self.batch, cfg.max_prompt_len)} (right-pad to max_prompt_len).")
        if prompt_lens.shape != (self.batch,):
            raise ValueError(f"prompt_lens has shape {prompt_lens.shape}; expected {(self.batch,)}.")
        if instruction.shape != (cfg.instruction_len,):
            raise ValueError(f"instruction has shape {instruction.shape}; SamplerConfig.instruction_len is "
                             f"{cfg.instruction_len}.")
        lens = _local_values(prompt_lens)
        if lens.min() < 1 or lens.max() > cfg.max_prompt_len:
            raise ValueError(f"prompt_lens must be in [1, {cfg.max_prompt_len}], got {lens.min()}..{lens.max()}.")
        V = self.model_cfg.vocab_size
        for name, ids in (("prompts", _local_values(prompts)), ("instruction", _local_values(instruction))):
            if ids.size and (ids.min() < 0 or ids.max() >= V):
                raise ValueError(f"{name} hold ids outside [0, {V}) (padding included); pad with a real id such as pad_id.")
        if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        cache, self._cache = (self._cache if self._cache is not None else self.init_cache()), None
        out, self._cache = self._run(params, prompts, prompt_lens, instruction, key, cache)
        return out

    def lower(self, params, prompts, prompt_lens, instruction, key, cache):
        """The rollout program lowered for abstract arguments (score_jax.plan): nothing runs."""
        with jax.set_mesh(self.mesh):
            return self.jitted.lower(params, prompts, prompt_lens, instruction, key, cache)

    def pack(self, out: dict, prompts, instruction) -> dict:
        """``pack_episodes`` of this sampler's output ``out`` (and the prompts [B,P] and
        instruction [I] it was called with), jit on the sampler's mesh: the episode arrays of a
        learner batch, each split over the batch axes along its rows."""
        return self._pack(out, prompts, instruction)

    def init_cache(self) -> dict:
        """Zeroed, sharded buffers of every chunk after the prompt's (the donated state)."""
        shapes = self._cache_shapes
        make = jax.jit(lambda: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
                       out_shardings=self.cache_shardings)
        return make()

    def cache_bytes(self) -> int:
        """Bytes of the whole KV cache, prompt chunk included."""
        m, dt = self.model_cfg, jnp.dtype(self.cfg.cache_dtype or self.model_cfg.dtype)
        slots = sum(size for _, _, size in self.layout)
        return 2 * m.num_layers * self.rows * m.num_kv_heads * slots * m.head_dim * dt.itemsize

    # -- internals

    def _shapes(self) -> dict:
        m, dt = self.model_cfg, jnp.dtype(self.cfg.cache_dtype or self.model_cfg.dtype)
        chunk = lambda c: jax.ShapeDtypeStruct((self.rows, m.num_kv_heads, c, m.head_dim), dt)  # noqa: E731
        per_layer = tuple(chunk(size) for _, _, size in self.layout[1:])
        return {"k": (per_layer,) * m.num_layers, "v": (per_layer,) * m.num_layers}

    def _program(self, params, prompts, prompt_lens, instruction, key, cache):
        mc, cfg = self.model_cfg, self.cfg
        net = model.bind(mc, params)
        layers = model.split_layers(mc, params)
        B, P = prompts.shape
        R, N, k = self.rows, cfg.max_new_tokens, cfg.samples_per_prompt
        cdt = jnp.dtype(cfg.cache_dtype or mc.dtype)
        stop_ids = jnp.asarray(cfg.stop_token_ids, jnp.int32)

        def constrain_pos(p):
            return sharding.constrain(p, model.CHUNK_POS_AXES)

        def next_logits(h):  # [R,1,D] -> [R,V]
            return sharding.constrain(net.unembed(h)[:, 0], ("batch", "act_vocab"))

        # ---- 1. prefill every prompt once (B rows)
        empty = jnp.zeros((B, mc.num_kv_heads, P, mc.head_dim), cdt)
        prompt_cache = {"k": ((empty,),) * mc.num_layers, "v": ((empty,),) * mc.num_layers,
                        "pos": (jnp.full((B, P), -1, jnp.int32),)}
        positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
        valid = positions < prompt_lens[:, None]
        h, prompt_cache = net.decode(prompts, positions, valid, prompt_cache, layers, 0, 0)
        h_last = jnp.take_along_axis(h, (prompt_lens - 1)[:, None, None], axis=1)  # [B,1,D]
        logits = net.unembed(h_last)[:, 0]  # [B,V]

        # ---- 2. k samples per prompt: replicate cache rows, not the prefill
        rep = lambda a: jnp.repeat(a, k, axis=0) if k > 1 else a  # noqa: E731
        logits = sharding.constrain(rep(logits), ("batch", "act_vocab"))
        prompt_lens = rep(prompt_lens)
        # Zeroing the reused buffers keeps stale (possibly non-finite) values of a previous
        # call out of masked slots, where 0 * NaN would still poison the attention output.
        rest = jax.tree.map(jnp.zeros_like, cache)
        ck = [[sharding.constrain(rep(prompt_cache["k"][i][0]), model.CHUNK_AXES)] + list(rest["k"][i])
              for i in range(mc.num_layers)]
        cv = [[sharding.constrain(rep(prompt_cache["v"][i][0]), model.CHUNK_AXES)] + list(rest["v"][i])
              for i in range(mc.num_layers)]
        cpos = [constrain_pos(rep(prompt_cache["pos"][0]))] + [
            constrain_pos(jnp.full((R, size), -1, jnp.int32)) for _, _, size in self.layout[1:]]

        def live(w):
            return {"k": tuple(tuple(c[:w + 1]) for c in ck), "v": tuple(tuple(c[:w + 1]) for c in cv),
                    "pos": tuple(cpos[:w + 1])}

        def store(w, c):
            for i in range(mc.num_layers):
                ck[i][:w + 1], cv[i][:w + 1] = c["k"][i], c["v"][i]
            cpos[:w + 1] = c["pos"]

        # ---- 3./4. turns
        cur_pos = prompt_lens  # [R] next position of each row
        turns, steps = [], []
        w = 0  # chunk index
        for t in range(cfg.num_turns):
            turn_key = jax.random.fold_in(key, t)
            start = cur_pos
            state = dict(s=jnp.zeros((), jnp.int32), logits=logits, active=jnp.ones((R,), bool), pos=cur_pos,
                         lengths=jnp.zeros((R,), jnp.int32), tokens=jnp.full((R, N), cfg.pad_id, jnp.int32),
                         logprobs=jnp.zeros((R, N), jnp.float32))
            for first, end in cfg.turn_chunks():
                w += 1
                state, chunk_cache = self._decode_loop(net, layers, stop_ids, turn_key, w, first, end, state, live(w))
                store(w, chunk_cache)
            logits, cur_pos = state["logits"], state["pos"]
            lengths = state["lengths"]
            turns.append({"tokens": state["tokens"], "logprobs": state["logprobs"],
                          "mask": jnp.arange(N)[None] < lengths[:, None], "lengths": lengths,
                          "truncated": state["active"], "start": start})
            steps.append(state["s"])
            if t < cfg.num_turns - 1:  # the instruction, right after each row's own last token
                w += 1
                I = cfg.instruction_len
                positions = cur_pos[:, None] + jnp.arange(I, dtype=jnp.int32)
                tokens = jnp.broadcast_to(instruction, (R, I))
                h, chunk_cache = net.decode(tokens, positions, jnp.ones((R, I), bool), live(w), layers, w, 0)
                store(w, chunk_cache)
                logits = next_logits(h[:, -1:])
                cur_pos = cur_pos + I

        out = {"turns": tuple(turns), "prompt_lens": prompt_lens, "steps": jnp.stack(steps)}
        new_cache = {"k": tuple(tuple(c[1:]) for c in ck), "v": tuple(tuple(c[1:]) for c in cv)}
        return out, new_cache

    def _decode_loop(self, net, layers, stop_ids, turn_key, w, first, end, state, cache):
        """Decode steps [first, end) of a turn into chunk w (or fewer, once every row stopped)."""
        cfg = self.cfg

        def cond(carry):
            state, _ = carry
            return (state["s"] < end) & jnp.any(state["active"])

        def body(carry):
            st, cache = carry
            s, logits, active = st["s"], st["logits"], st["active"]
            tok = sample_tokens(cfg, logits, jax.random.fold_in(turn_key, s))
            lp = losses.token_logprobs(logits, tok)  # [R]
            tok = jnp.where(active, tok, cfg.pad_id)
            stop = active & jnp.any(tok[:, None] == stop_ids[None], axis=-1)
            h, cache = net.decode(tok[:, None], st["pos"][:, None], active[:, None], cache, layers, w, s - first)
            return dict(
                s=s + 1,
                logits=sharding.constrain(net.unembed(h)[:, 0], ("batch", "act_vocab")),
                active=active & ~stop,
                pos=st["pos"] + active,
                lengths=st["lengths"] + active,
                tokens=jax.lax.dynamic_update_slice(st["tokens"], tok[:, None], (0, s)),
                logprobs=jax.lax.dynamic_update_slice(st["logprobs"], jnp.where(active, lp, 0.0)[:, None], (0, s)),
            ), cache

        return jax.lax.while_loop(cond, body, (state, cache))


# ----------------------------------------------------------------------------- episodes


def _episode_ndims(cfg: SamplerConfig) -> dict[str, int]:
    """The keys of ``pack_episodes``' result and their ranks."""
    ndims = {"tokens": 2, "valid": 2}
    for t in range(1, cfg.num_turns + 1):
        ndims.update({f"start{t}": 1, f"mask{t}": 2, f"logp{t}_sampler": 2, f"truncated{t}": 1})
    return ndims


def pack_episodes(cfg: SamplerConfig, out: dict, prompts, instruction) -> dict:
    """The sampled episodes as [R, T] arrays, token j at position j (T = ``cfg.episode_len()``):
    prompt, turn 1, instruction, turn 2, ... each row contiguous, then padding; with each
    turn's fields under the learner's batch keys (``learner.RL_BATCH_KEYS`` for two turns).

    prompts [B, P] are the sampler's inputs (replicated to R rows here). Returns
    "tokens" [R,T] int32 (pad_id in padding), "valid" [R,T] bool and, for turn t = 1 ..
    num_turns, "start{t}" [R] (position of the turn's first token), "mask{t}" [R,N] (its
    tokens), "logp{t}_sampler" [R,N] (the sampler's log-probs) and "truncated{t}" [R]. A full
    forward over "tokens" at positions 0..T-1 with "valid" reproduces the sampler's logits, so
    the learner reads token i of turn t at position start{t} + i.
    """
    R = out["prompt_lens"].shape[0]
    prompts = jnp.repeat(jnp.asarray(prompts, jnp.int32), R // prompts.shape[0], axis=0)
    P, N, I, T = cfg.max_prompt_len, cfg.max_new_tokens, cfg.instruction_len, cfg.episode_len()
    rows = jnp.arange(R)[:, None]
    tokens = jnp.full((R, T), cfg.pad_id, jnp.int32)

    def put(arr, idx, keep, vals):
        return arr.at[rows, jnp.where(keep, idx, T)].set(vals, mode="drop")

    lens = out["prompt_lens"][:, None]
    idx = jnp.broadcast_to(jnp.arange(P), (R, P))
    tokens = put(tokens, idx, idx < lens, prompts)
    end = out["prompt_lens"]
    packed = {}
    for t, turn in enumerate(out["turns"]):
        idx = turn["start"][:, None] + jnp.arange(N)
        tokens = put(tokens, idx, turn["mask"], turn["tokens"])
        end = turn["start"] + turn["lengths"]
        if t < len(out["turns"]) - 1:
            idx = end[:, None] + jnp.arange(I)
            tokens = put(tokens, idx, jnp.ones((R, I), bool), jnp.broadcast_to(jnp.asarray(instruction, jnp.int32), (R, I)))
        packed.update({f"start{t + 1}": turn["start"], f"mask{t + 1}": turn["mask"],
                       f"logp{t + 1}_sampler": turn["logprobs"], f"truncated{t + 1}": turn["truncated"]})
    valid = jnp.arange(T)[None] < end[:, None]
    return {"tokens": tokens, "valid": valid, **packed}
