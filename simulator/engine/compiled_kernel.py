"""The step-by-step engine over arrays, compiled with numba (``simulator.engine.compiled``).

A line-for-line port of what one replica's step-by-step path does (simulator.engine.loop's
engine loop, arrivals and client-timeout aborts, simulator.engine.native's scheduler,
simulator.engine.kv_cache's blocks, free queue and prefix cache: shared prefixes and a preempted
request's own blocks; and ``ComposedPerformanceModel.step_time`` from its tables) for the runs
``simulator.engine.compiled`` admits: no speculative decoding, no sliding-window layers. Every
request's state is a row of ``ri`` (integers) and ``rf`` (times), every block's a row of ``bk``;
the engine's scalars live in ``S`` and ``F``, so a call (``advance``) returns between two steps
and the next call goes on from there. The order of arrivals and steps ending at one time is SimPy's: the event
made first comes first (``S[SEQ]`` numbers them as SimPy numbers its events).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from simulator.engine.kv_cache import TICKS_PER_S

# --- request rows: ri[rid, ...] -------------------------------------------------------------
PROMPT, MAXTOK, REASON, STATUS, NOUT, NCOMP, PLACE, INFL, STALE, NPRE, CACHEDTOK, NBLK, NCACHEDBLK, \
    HOLDSNAMED, ACQ, TBASE, BTICKS, HASTICKS, OFF, CAP, NAMED, REJECTED, NSHARED, NOUTER, SBASE_OUT, SBASE_PRE \
    = range(26)
NRI = 26
# a block's name (bk[b, OWNER]): none, a shared prefix block (its list of copies at bk[b, SLOT] of
# ``chead``), or the request whose private block it holds (the list at its OFF + index)
NO_HASH, SHARED = -1, -2
# rf[rid, ...]
ARRIVAL, FSCHED, FTOKEN, FVISIBLE, LTOKEN, FINISH = range(6)
NRF = 6
# request status (simulator.engine.request.Status), and not arrived yet
NOT_ARRIVED, WAITING, RUNNING, PREEMPTED, FINISHED, REJECTED_STATUS, ABORTED = -1, 0, 1, 2, 3, 4, 5

# --- block rows: bk[block, ...] ---------------------------------------------------------------
QPREV, QNEXT, INQ, REF, OWNER, SLOT, CPREV, CNEXT = range(8)
NBK = 8

# --- integer scalars S ------------------------------------------------------------------------------
(QHEAD, QTAIL, QLEN, STEP, NRUN, WHEAD, WLEN, NEXT, ASEQ, SEQ, DONE, NFL, FLFIRST, UNLOGGED, NFINISHED,
 PQUERIES, PHITS, NLOG, ENDED, ARRIVED, TARGET,
 X_TOKENS, X_PKVH, X_PBATCH, X_PLEN, X_DKVH, X_DBATCH, X_DCTX,
 NUM_BLOCKS, BLOCK_SIZE, MAX_LEN, MAX_SEQS, BUDGET, THRESHOLD, CHUNKED, CACHING, ASYNC, DPTR,
 KNOWN, OPEN, URGENT, PHASE, NREJ) = range(43)
NS = 43
# KNOWN: the arrivals known so far (rows of ri); OPEN: more may come (a cluster's router adds them);
# URGENT: an arrival comes before the engine's events of its time (a cluster's, routed at its time:
# SimPy's urgent priority), else in the order made (one replica's arrivals process); PHASE: 1 while
# the engine waits for the step ending at fl_f[., FL_END] (a call may return there: UNTIL); NREJ:
# arrivals rejected so far
# float scalars F: the clock, the KV cache's clock, the next arrival's time, and the time from
# which nothing may happen before a caller has been asked (a cluster's next routing decision)
NOW, CLOCK, ATIME, UNTIL = range(4)
NF = 4

# --- in-flight steps: two slots --------------------------------------------------------------
# fl_i[slot, ...]
FL_CNT, FL_PRE, FL_PREFILL, FL_DEC = range(4)
NFLI = 4
# fl_f[slot, ...]
FL_START, FL_END = range(2)

# --- what ``advance`` returns -----------------------------------------------------------------
# (HORIZON: paused where the next event would come at or after F[UNTIL], or waiting for an arrival
# not known yet)
DONE_CODE, PAUSED, STALLED, OVERFLOW, HORIZON = 0, 1, 2, 3, 4
GO_ON = -1  # (``_wait_for_arrival``: the loop goes on)

# step-log columns: lg_f (end_s, step_s), lg_i (simulator.engine.run_log.STEP_COLUMNS after them)
LG_KV, LG_RUNNING, LG_WAITING, LG_PREFILL, LG_DECODE, LG_BATCH, LG_PREEMPTED = range(7)



# --- the free-block queue (vLLM's FreeKVCacheBlockQueue, a doubly linked list) ---------------
@njit(cache=True)
def _pop_front(S, bk):
    b = S[QHEAD]
    nxt = bk[b, QNEXT]
    S[QHEAD] = nxt
    if nxt >= 0:
        bk[nxt, QPREV] = -1
    else:
        S[QTAIL] = -1
    bk[b, INQ] = 0
    S[QLEN] -= 1
    return b


@njit(cache=True)
def _push_front(S, bk, b):
    head = S[QHEAD]
    bk[b, QNEXT] = head
    bk[b, QPREV] = -1
    if head >= 0:
        bk[head, QPREV] = b
    else:
        S[QTAIL] = b
    S[QHEAD] = b
    bk[b, INQ] = 1
    S[QLEN] += 1


@njit(cache=True)
def _push_back(S, bk, b):
    tail = S[QTAIL]
    bk[b, QPREV] = tail
    bk[b, QNEXT] = -1
    if tail >= 0:
        bk[tail, QNEXT] = b
    else:
        S[QHEAD] = b
    S[QTAIL] = b
    bk[b, INQ] = 1
    S[QLEN] += 1


@njit(cache=True)
def _remove(S, bk, b):
    p, q = bk[b, QPREV], bk[b, QNEXT]
    if p >= 0:
        bk[p, QNEXT] = q
    else:
        S[QHEAD] = q
    if q >= 0:
        bk[q, QPREV] = p
    else:
        S[QTAIL] = p
    bk[b, INQ] = 0
    S[QLEN] -= 1


# --- private prefix-cache names (kv_cache: a request's own blocks, named when it frees them) --
@njit(cache=True)
def _name(bk, chead, b, owner, at):
    """Block ``b`` gets a name: ``owner`` (a request, its private block; or SHARED) and the list of
    that name's copies at ``chead[at]``, where it is the newest (the oldest answers look-ups)."""
    bk[b, OWNER] = owner
    bk[b, SLOT] = at
    bk[b, CNEXT] = -1
    h = chead[at]
    if h < 0:
        chead[at] = b
        bk[b, CPREV] = -1
    else:
        while bk[h, CNEXT] >= 0:
            h = bk[h, CNEXT]
        bk[h, CNEXT] = b
        bk[b, CPREV] = h


@njit(cache=True)
def _evict(bk, chead, b):
    """Block ``b`` leaves the free queue for a new use: its name, if any, is dropped (a shared
    name with no copy left is gone)."""
    if bk[b, OWNER] == NO_HASH:
        return
    p, q = bk[b, CPREV], bk[b, CNEXT]
    if p >= 0:
        bk[p, CNEXT] = q
    else:
        chead[bk[b, SLOT]] = q
    if q >= 0:
        bk[q, CPREV] = p
    bk[b, OWNER] = NO_HASH


@njit(cache=True)
def _shared_slot(ri, rid, i):
    """Where the copies of ``rid``'s shared block ``i`` are listed: its outer group's below
    NOUTER, else its own group's (SimRequest.shared_name)."""
    return (ri[rid, SBASE_OUT] if i < ri[rid, NOUTER] else ri[rid, SBASE_PRE]) + i


@njit(cache=True)
def _shared_hits(ri, chead, rid, wanted, hits):
    """KVCacheManager.computed_blocks' shared part: the oldest copy of each of the request's shared
    blocks below ``wanted``, up to the first missing one; returns (how many, whether all hit)."""
    n = ri[rid, NSHARED]
    if wanted < n:
        n = wanted
    for i in range(n):
        b = chead[_shared_slot(ri, rid, i)]
        if b < 0:
            return i, False
        hits[i] = b
    return n, True


# --- the KV cache manager ---------------------------------------------------------------------
@njit(cache=True)
def _ticks(clock):
    return np.int64(np.rint(clock * TICKS_PER_S))


@njit(cache=True)
def _cdiv(a, b):
    return -(-a // b)


@njit(cache=True)
def _allocate(S, F, ri, bk, bt, chead, rid, slots, hits, nhit):
    """KVCacheManager.allocate: blocks for ``slots`` token slots, the prefix hits ``hits[:nhit]``
    adopted first; False (nothing changed) when the free blocks do not cover them."""
    bs = S[BLOCK_SIZE]
    held = ri[rid, NBLK]
    if held > 0 and nhit == 0 and slots <= held * bs:
        return True
    num_new = _cdiv(slots, bs) - held - nhit
    if num_new < 0:
        num_new = 0
    free_hits = 0
    for j in range(nhit):
        if bk[hits[j], REF] == 0:
            free_hits += 1
    if num_new + free_hits > S[QLEN]:  # (a hit another request holds takes no free block)
        return False
    if nhit == 0 and num_new == 0:
        return True
    if held + nhit + num_new > ri[rid, CAP]:
        S[ENDED] = 2  # (a table sized too small: the caller falls back)
        return False
    base = ri[rid, OFF] + held
    if nhit:
        ri[rid, HOLDSNAMED] = 1
        for j in range(nhit):
            b = hits[j]
            if bk[b, REF] == 0:
                _remove(S, bk, b)
            bk[b, REF] += 1
            bt[base + j] = b
    for j in range(num_new):
        b = _pop_front(S, bk)
        _evict(bk, chead, b)
        bk[b, REF] = 1
        bt[base + nhit + j] = b
    ri[rid, NBLK] = held + nhit + num_new
    t = _ticks(F[CLOCK])
    if ri[rid, TBASE] < 0:  # (its block-seconds count ticks from its first block: int64 sums)
        ri[rid, TBASE] = t
    ri[rid, ACQ] += (nhit + num_new) * (t - ri[rid, TBASE])
    return True


@njit(cache=True)
def _more_full_blocks(S, ri, rid, num_tokens):
    """Whether ``cache_full_blocks`` has anything to do (prefix caching on and a block filled
    since): asked at the call sites, the hottest test of a step, before the call itself."""
    return S[CACHING] != 0 and num_tokens // S[BLOCK_SIZE] > ri[rid, NCACHEDBLK]


@njit(cache=True)
def _cache_full_blocks(S, ri, bk, bt, chead, rid, num_tokens):
    """KVCacheManager.cache_full_blocks where ``_more_full_blocks``: the request's full blocks
    counted as cached; its shared prefix blocks among them named at once (private ones are named
    when it frees them)."""
    full = num_tokens // S[BLOCK_SIZE]
    done = ri[rid, NCACHEDBLK]
    if full > ri[rid, NBLK]:
        full = ri[rid, NBLK]
    if full <= done:
        return
    ri[rid, NCACHEDBLK] = full
    shared = ri[rid, NSHARED] if ri[rid, NSHARED] < full else full
    off = ri[rid, OFF]
    for i in range(done, shared):
        b = bt[off + i]
        if bk[b, OWNER] == NO_HASH:
            _name(bk, chead, b, SHARED, _shared_slot(ri, rid, i))
            ri[rid, HOLDSNAMED] = 1


@njit(cache=True)
def _free(S, F, ri, bk, bt, chead, rid, finished):
    """KVCacheManager.free: the request's blocks back to the free queue, tail first; blocks
    without a name at the front, named (cached) ones at the back."""
    held = ri[rid, NBLK]
    num_cached = ri[rid, NCACHEDBLK]
    ri[rid, NCACHEDBLK] = 0
    ri[rid, NBLK] = 0
    if held == 0:
        return
    ri[rid, BTICKS] += held * (_ticks(F[CLOCK]) - ri[rid, TBASE]) - ri[rid, ACQ]
    ri[rid, ACQ] = 0
    ri[rid, HASTICKS] = 1
    off = ri[rid, OFF]
    if ri[rid, HOLDSNAMED] == 0:
        if num_cached and not finished:
            for i in range(num_cached):
                _name(bk, chead, bt[off + i], rid, off + i)
            ri[rid, NAMED] = 1
        for i in range(held):
            bk[bt[off + i], REF] = 0
        for i in range(num_cached, held):  # (push_front of the tail, last block first)
            _push_front(S, bk, bt[off + i])
        for i in range(num_cached - 1, -1, -1):
            _push_back(S, bk, bt[off + i])
        return
    ri[rid, HOLDSNAMED] = 0
    for i in range(num_cached):
        b = bt[off + i]
        if bk[b, OWNER] == NO_HASH:
            _name(bk, chead, b, rid, off + i)
            ri[rid, NAMED] = 1
    for i in range(held):
        bk[bt[off + i], REF] -= 1
    for i in range(held):  # unnamed ones, tail first, to the front in that order
        b = bt[off + i]
        if bk[b, REF] == 0 and bk[b, OWNER] == NO_HASH:
            _push_front(S, bk, b)
    for i in range(held - 1, -1, -1):
        b = bt[off + i]
        if bk[b, REF] == 0 and bk[b, OWNER] != NO_HASH:
            _push_back(S, bk, b)


# --- queues -------------------------------------------------------------------------------------
@njit(cache=True)
def _wait_at(S, waiting, k):
    return waiting[(S[WHEAD] + k) % len(waiting)]


@njit(cache=True)
def _wait_popleft(S, waiting):
    rid = waiting[S[WHEAD]]
    S[WHEAD] = (S[WHEAD] + 1) % len(waiting)
    S[WLEN] -= 1
    return rid


@njit(cache=True)
def _wait_appendleft(S, waiting, rid):
    S[WHEAD] = (S[WHEAD] - 1) % len(waiting)
    waiting[S[WHEAD]] = rid
    S[WLEN] += 1


@njit(cache=True)
def _wait_append(S, waiting, rid):
    waiting[(S[WHEAD] + S[WLEN]) % len(waiting)] = rid
    S[WLEN] += 1


@njit(cache=True)
def _wait_remove(S, waiting, rid):
    n = len(waiting)
    k = 0
    while k < S[WLEN] and waiting[(S[WHEAD] + k) % n] != rid:
        k += 1
    if k == S[WLEN]:
        return
    for j in range(k, S[WLEN] - 1):
        waiting[(S[WHEAD] + j) % n] = waiting[(S[WHEAD] + j + 1) % n]
    S[WLEN] -= 1


# --- the performance model's step time (ComposedPerformanceModel.step_time) -------------------
@njit(cache=True)
def _grid(g, log, x, y):
    """LogGrid2D.__call__; ``g``: res, nx, ny, x_top, y_top, x_power, y_power, width."""
    res, nx, ny, x_top, y_top, x_power, y_power, width = g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7]
    scale = 1.0
    if x > x_top:
        scale = (x / x_top) ** x_power
        x = x_top
    if y > y_top:
        scale *= (y / y_top) ** y_power
        y = y_top
    fx = math.log2(x) * res if x > 1.0 else 0.0
    fy = math.log2(y) * res if y > 1.0 else 0.0
    i = min(int(fx), int(nx) - 1)
    j = min(int(fy), int(ny) - 1)
    tx = fx - i
    ty = fy - j
    w = int(width)
    a = i * w + j
    b = a + w
    low = log[a] + (log[a + 1] - log[a]) * ty
    high = log[b] + (log[b + 1] - log[b]) * ty
    return math.exp(low + (high - low) * tx) * scale


@njit(cache=True)
def _step_time(S, P, dense, head, gc, lc, gg, lg, limits, n_pre, prefill_sum, work, kv_tokens, n_dec, ctx_sum):
    """ComposedPerformanceModel.step_time for a batch of ``n_pre`` prefill chunks (``prefill_sum``
    tokens, ``work``: the sum of q (2c + q), ``kv_tokens``: of q + c) and ``n_dec`` decodes
    (attending over ``ctx_sum`` tokens in all); P: overhead_s, dense_slope, max_tokens,
    head_slope, max_rows, kv_read_s_per_token. Counts the queries beyond the measured range."""
    m = prefill_sum + n_dec
    rows = n_pre + n_dec
    t = P[0]
    if m > limits[0]:
        S[X_TOKENS] += 1
    max_tokens = int(P[2])
    if m <= max_tokens:
        t += dense[m]
    else:
        t += dense[max_tokens] + (m - max_tokens) * P[1]
    max_rows = int(P[4])
    if rows <= max_rows:
        t += head[rows]
    else:
        t += head[max_rows] + (rows - max_rows) * P[3]
    if n_pre:
        s_eff = math.sqrt(work / n_pre)
        if n_pre > limits[1] or s_eff > limits[2]:
            S[X_PKVH] += 1 if limits[9] else 0
            S[X_PBATCH] += 1 if n_pre > limits[5] else 0
            S[X_PLEN] += 1 if s_eff > limits[6] else 0
        attn = _grid(gc, lc, n_pre, s_eff)
        floor = kv_tokens * P[5]
        t += attn if attn >= floor else floor
    if n_dec:
        kv = ctx_sum / n_dec
        if n_dec > limits[3] or kv > limits[4]:
            S[X_DKVH] += 1 if limits[10] else 0
            S[X_DBATCH] += 1 if n_dec > limits[7] else 0
            S[X_DCTX] += 1 if kv > limits[8] else 0
        t += _grid(gg, lg, n_dec, kv)
    return t


# --- client timeouts (Engine._abort_due, NativeScheduler.finish_requests) --------------------------
@njit(cache=True)
def _abort_due(S, F, ri, rf, bk, bt, chead, running, waiting, dl_t, dl_rid):
    """The requests whose client gave up by now leave (deadlines in order, then request ids): out
    of the queue, their blocks freed, aborted."""
    now = F[NOW]
    p = S[DPTR]
    aborted = 0
    while p < len(dl_t) and dl_t[p] <= now:
        rid = dl_rid[p]
        status = ri[rid, STATUS]
        if status == NOT_ARRIVED:  # (arriving at this very time, after this check: the next one)
            break
        p += 1
        if status >= FINISHED:
            continue
        if status != RUNNING:  # (waiting, or preempted and waiting again)
            _wait_remove(S, waiting, rid)
        ri[rid, STATUS] = ABORTED
        rf[rid, FINISH] = now
        _free(S, F, ri, bk, bt, chead, rid, True)
        aborted += 1
    S[DPTR] = p
    if aborted:
        k = 0
        for i in range(S[NRUN]):
            rid = running[i]
            if ri[rid, STATUS] == RUNNING:
                running[k] = rid
                k += 1
        S[NRUN] = k
        S[NFINISHED] += aborted


# --- the scheduler (NativeScheduler.schedule) ----------------------------------------------------
@njit(cache=True)
def _preempt(S, F, ri, bk, bt, chead, waiting, rid):
    _free(S, F, ri, bk, bt, chead, rid, False)
    ri[rid, STATUS] = PREEMPTED
    ri[rid, NCOMP] = 0
    ri[rid, STALE] = ri[rid, INFL]
    ri[rid, PLACE] = 0
    ri[rid, NPRE] += 1
    _wait_appendleft(S, waiting, rid)


@njit(cache=True)
def _running_tokens(S, ri, rid, threshold):
    """rules.running_tokens."""
    computed, placeholders = ri[rid, NCOMP], ri[rid, PLACE]
    if placeholders > 0 and computed + 2 - placeholders >= ri[rid, PROMPT] + ri[rid, MAXTOK]:
        return 0
    n = ri[rid, PROMPT] + ri[rid, NOUT] + placeholders - computed
    if 0 < threshold < n:
        n = threshold
    room = S[MAX_LEN] - computed - 1
    if room < n:
        n = room
    return n if n > 0 else 0


@njit(cache=True)
def _schedule(S, F, ri, rf, bk, bt, chead, running, waiting, fl_rid, fl_n, fl_i, slot, hits, skipped):
    """One step's decisions into in-flight ``slot``: the running requests in order (preempting
    from the back when a block is short), then, if none was preempted, the queue first come first
    served. The batch's step-time inputs are left in ``fl_i``; returns (n_pre, prefill tokens, work,
    kv tokens, n_dec, decode context) of the batch for its step time."""
    S[STEP] += 1
    budget = S[BUDGET]
    threshold = S[THRESHOLD]
    max_len = S[MAX_LEN]
    bs = S[BLOCK_SIZE]
    if S[NRUN] + S[WLEN] <= 1:
        threshold = 0
    cnt = 0
    pre = 0
    i = 0
    while i < S[NRUN] and budget > 0:
        rid = running[i]
        n = _running_tokens(S, ri, rid, threshold)
        if n > budget:
            n = budget
        if n <= 0:
            i += 1
            continue
        computed = ri[rid, NCOMP]
        slots = computed + n
        if slots > max_len:
            slots = max_len
        preempted_self = False
        held = ri[rid, NBLK]
        room = held > 0 and slots <= held * bs  # (the usual decode step; asked here, where it is quickest)
        while not room and not _allocate(S, F, ri, bk, bt, chead, rid, slots, hits, 0):
            if S[ENDED] == 2:
                return 0, 0, 0, 0, 0, 0
            victim = running[S[NRUN] - 1]
            S[NRUN] -= 1
            _preempt(S, F, ri, bk, bt, chead, waiting, victim)
            pre += 1
            if victim == rid:
                preempted_self = True
                break
        if preempted_self:
            break
        num_tokens = ri[rid, PROMPT] + ri[rid, NOUT]
        upto = computed + n if computed + n < num_tokens else num_tokens
        if _more_full_blocks(S, ri, rid, upto):
            _cache_full_blocks(S, ri, bk, bt, chead, rid, upto)
        fl_rid[slot, cnt] = rid
        fl_n[slot, cnt] = n
        cnt += 1
        budget -= n
        i += 1
    if pre == 0:  # the queue (_schedule_waiting)
        nskip = 0
        while budget > 0 and S[WLEN] > 0:
            if S[NRUN] >= S[MAX_SEQS]:
                break
            rid = _wait_at(S, waiting, 0)
            if ri[rid, STALE]:
                skipped[nskip] = _wait_popleft(S, waiting)
                nskip += 1
                continue
            num_tokens = ri[rid, PROMPT] + ri[rid, NOUT]
            # the gate (_blocks_to_admit): the whole sequence's blocks, its shared hits adopted
            wanted = (num_tokens - 1) // bs
            nhit, all_shared = 0, True
            if S[CACHING]:
                nhit, all_shared = _shared_hits(ri, chead, rid, wanted, hits)
            need = _cdiv(num_tokens if num_tokens < max_len else max_len, bs) - nhit
            if need < 0:
                need = 0
            for j in range(nhit):
                if bk[hits[j], REF] == 0:
                    need += 1
            if need > S[QLEN]:
                break
            if S[CACHING] and all_shared and wanted > nhit and ri[rid, NAMED]:
                # its own blocks after the shared ones, cached when it was preempted
                off = ri[rid, OFF]
                while nhit < wanted and chead[off + nhit] >= 0:
                    hits[nhit] = chead[off + nhit]
                    nhit += 1
            num_computed = nhit * bs
            n = num_tokens - num_computed
            if 0 < threshold < n:
                n = threshold
            if S[CHUNKED] == 0 and n > budget:
                break
            if n > budget:
                n = budget
            slots = num_computed + n
            if slots > max_len:
                slots = max_len
            if not _allocate(S, F, ri, bk, bt, chead, rid, slots, hits, nhit):
                break
            if ri[rid, NPRE] == 0 or ri[rid, CACHEDTOK] < 0:
                S[PQUERIES] += num_tokens
                S[PHITS] += num_computed
            _wait_popleft(S, waiting)
            running[S[NRUN]] = rid
            S[NRUN] += 1
            if rf[rid, FSCHED] < 0:
                rf[rid, FSCHED] = F[CLOCK]
            fl_rid[slot, cnt] = rid
            fl_n[slot, cnt] = n
            cnt += 1
            budget -= n
            ri[rid, STATUS] = RUNNING
            ri[rid, NCOMP] = num_computed
            if ri[rid, CACHEDTOK] < 0:
                ri[rid, CACHEDTOK] = num_computed
            upto = num_computed + n if num_computed + n < num_tokens else num_tokens
            if _more_full_blocks(S, ri, rid, upto):
                _cache_full_blocks(S, ri, bk, bt, chead, rid, upto)
        for j in range(nskip - 1, -1, -1):
            _wait_appendleft(S, waiting, skipped[j])
    # _after_schedule: computed tokens advance, the batch is described
    n_pre = prefill = work = kv_tokens = n_dec = ctx = 0
    for j in range(cnt):
        rid = fl_rid[slot, j]
        n = fl_n[slot, j]
        before = ri[rid, NCOMP]
        num_tokens = ri[rid, PROMPT] + ri[rid, NOUT]
        placeholders = ri[rid, PLACE]
        if before >= num_tokens - 1 + placeholders and n <= 1:
            n_dec += 1
            ctx += before + 1
        else:
            n_pre += 1
            prefill += n
            work += n * (2 * before + n)
            kv_tokens += n + before
        ri[rid, NCOMP] = before + n
        ri[rid, INFL] += n
        if before + n >= num_tokens + placeholders:
            fl_n[slot, j] = -n  # (sampling: marked by the sign)
            if S[ASYNC]:
                ri[rid, PLACE] = placeholders + 1
    fl_i[slot, FL_CNT] = cnt
    fl_i[slot, FL_PRE] = pre
    fl_i[slot, FL_PREFILL] = prefill
    fl_i[slot, FL_DEC] = n_dec
    return n_pre, prefill, work, kv_tokens, n_dec, ctx


@njit(cache=True)
def _apply(S, F, ri, rf, bk, bt, chead, running, waiting, fl_rid, fl_n, fl_i, fl_f, slot, lg_f, lg_i):
    """A step's output at now (NativeScheduler.update_from_output): one token per sampling
    request, finishes freed and taken out of the running requests; the step logged."""
    now = F[NOW]
    F[CLOCK] = now
    max_len = S[MAX_LEN]
    nfin = 0
    for j in range(fl_i[slot, FL_CNT]):
        rid = fl_rid[slot, j]
        n = fl_n[slot, j]
        sampling = n < 0
        if sampling:
            n = -n
        ri[rid, INFL] -= n
        stale = ri[rid, STALE] > 0
        if stale:
            ri[rid, STALE] -= n
        if ri[rid, STATUS] >= FINISHED or not sampling:
            continue
        num_output = ri[rid, NOUT]
        num_tokens = ri[rid, PROMPT] + num_output
        room = ri[rid, MAXTOK] - num_output
        if max_len - num_tokens < room:
            room = max_len - num_tokens
        delivered = 1 if room >= 1 else 0
        if delivered:
            if num_output == 0:
                rf[rid, FTOKEN] = now
            if rf[rid, FVISIBLE] < 0 and ri[rid, REASON] == num_output:
                rf[rid, FVISIBLE] = now
            ri[rid, NOUT] = num_output + 1
            rf[rid, LTOKEN] = now
            stopped = num_output + 1 >= ri[rid, MAXTOK] or num_tokens + 1 >= max_len
        else:
            stopped = True
        if not stale:
            p = ri[rid, PLACE] - delivered
            ri[rid, PLACE] = p if p > 0 else 0
        if S[ASYNC] and ri[rid, STATUS] == RUNNING and _more_full_blocks(S, ri, rid, ri[rid, NCOMP] - ri[rid, PLACE]):
            _cache_full_blocks(S, ri, bk, bt, chead, rid, ri[rid, NCOMP] - ri[rid, PLACE])
        if stopped:  # NativeScheduler.finish
            if ri[rid, STATUS] == PREEMPTED:
                _wait_remove(S, waiting, rid)
            ri[rid, STATUS] = FINISHED
            rf[rid, FINISH] = now
            _free(S, F, ri, bk, bt, chead, rid, True)
            nfin += 1
    if nfin:
        k = 0
        for i in range(S[NRUN]):
            rid = running[i]
            if ri[rid, STATUS] != FINISHED:
                running[k] = rid
                k += 1
        S[NRUN] = k
        S[NFINISHED] += nfin
    row = S[NLOG]
    lg_f[row, 0] = now
    lg_f[row, 1] = now - fl_f[slot, FL_START]
    lg_i[row, LG_KV] = S[NUM_BLOCKS] - 1 - S[QLEN]
    lg_i[row, LG_RUNNING] = S[NRUN]
    lg_i[row, LG_WAITING] = S[WLEN]
    lg_i[row, LG_PREFILL] = fl_i[slot, FL_PREFILL]
    lg_i[row, LG_DECODE] = fl_i[slot, FL_DEC]
    lg_i[row, LG_BATCH] = fl_i[slot, FL_CNT]
    lg_i[row, LG_PREEMPTED] = fl_i[slot, FL_PRE] + S[UNLOGGED]
    S[UNLOGGED] = 0
    S[NLOG] = row + 1


# --- arrivals (Engine._arrivals) ------------------------------------------------------------------
@njit(cache=True)
def _arrivals_from(S, F, ri, rf, waiting, rid):
    """The arrivals process at now from ``rid`` on: each arrival due by now enters (rejected ones
    finish at once), then the next one's timeout is made (SimPy's next event number)."""
    n = S[KNOWN]
    now = F[NOW]
    while rid < n and rf[rid, ARRIVAL] <= now:
        if ri[rid, REJECTED]:
            ri[rid, STATUS] = REJECTED_STATUS
            rf[rid, FINISH] = rf[rid, ARRIVAL]
            S[NFINISHED] += 1
            S[NREJ] += 1
        else:
            ri[rid, STATUS] = WAITING
            _wait_append(S, waiting, rid)
        rid += 1
        S[ARRIVED] = rid
    S[NEXT] = rid
    if rid >= n:
        S[DONE] = 1 - S[OPEN]
        S[ASEQ] = -1
    else:
        F[ATIME] = rf[rid, ARRIVAL]
        S[ASEQ] = S[SEQ]
        S[SEQ] += 1


@njit(cache=True)
def _wait_until(S, F, ri, rf, waiting, t):
    """The engine waits for a timeout ending at ``t`` (made now): the arrivals SimPy runs first
    (earlier, or at ``t`` and made before it) come in, then the clock is at ``t``."""
    seq = S[SEQ]
    S[SEQ] += 1
    while S[ASEQ] >= 0 and (F[ATIME] < t or (F[ATIME] == t and (S[URGENT] or S[ASEQ] < seq))):
        F[NOW] = F[ATIME]
        _arrivals_from(S, F, ri, rf, waiting, S[NEXT])
    F[NOW] = t


@njit(cache=True)
def _wait_for_arrival(S, F, ri, rf, waiting):
    """The engine, with nothing to schedule, waits for the next arrival (``_idle``; GO_ON): STALLED
    if none will come, HORIZON if none is known before ``F[UNTIL]`` (a cluster's router decides
    first)."""
    if S[DONE]:
        return STALLED
    if S[ASEQ] < 0 or F[ATIME] >= F[UNTIL]:
        return HORIZON
    _idle(S, F, ri, rf, waiting)
    return GO_ON


@njit(cache=True)
def _idle(S, F, ri, rf, waiting):
    """The engine waits for the next arrival."""
    F[NOW] = F[ATIME]
    _arrivals_from(S, F, ri, rf, waiting, S[NEXT])


# --- the engine loop (Engine._run_async / _run_sync) -----------------------------------------------
@njit(cache=True)
def advance(S, F, ri, rf, bk, bt, chead, running, waiting, hits, skipped, fl_rid, fl_n, fl_i, fl_f,
            lg_f, lg_i, dl_t, dl_rid, P, dense, head, gc, lc, gg, lg, limits):
    """Run the engine loop until it ends (DONE_CODE), the step log's buffer is full or
    ``S[TARGET]`` requests have finished (PAUSED: call again to go on), its next event would come
    at or after ``F[UNTIL]`` or it waits for an arrival not known yet (HORIZON: call again once
    ``F[UNTIL]`` is later or an arrival is added), or it stalls."""
    capacity = len(lg_f)
    while True:
        if S[ENDED] == 1:
            return DONE_CODE
        if S[ENDED] == 2:
            return OVERFLOW
        if S[NLOG] >= capacity or S[NFINISHED] >= S[TARGET]:
            return PAUSED
        if S[PHASE] == 0 and F[NOW] >= F[UNTIL]:
            return HORIZON
        has_requests = S[NRUN] > 0 or S[WLEN] > 0
        if S[ASYNC]:
            if S[PHASE] == 0:
                only_preempted = False
                if has_requests:
                    F[CLOCK] = F[NOW]
                    if S[DPTR] < len(dl_t) and dl_t[S[DPTR]] <= F[NOW]:
                        _abort_due(S, F, ri, rf, bk, bt, chead, running, waiting, dl_t, dl_rid)
                    slot = (S[FLFIRST] + S[NFL]) % 2
                    n_pre, prefill, work, kv_tokens, n_dec, ctx = _schedule(
                        S, F, ri, rf, bk, bt, chead, running, waiting, fl_rid, fl_n, fl_i, slot, hits, skipped)
                    if S[ENDED] == 2:
                        return OVERFLOW
                    if fl_i[slot, FL_CNT] > 0:
                        start = fl_f[(S[FLFIRST] + S[NFL] - 1) % 2, FL_END] if S[NFL] else F[NOW]
                        fl_f[slot, FL_START] = start
                        fl_f[slot, FL_END] = start + _step_time(S, P, dense, head, gc, lc, gg, lg, limits, n_pre,
                                                                prefill, work, kv_tokens, n_dec, ctx)
                        S[NFL] += 1
                        if S[NFL] < 2:
                            continue
                    else:
                        only_preempted = fl_i[slot, FL_PRE] > 0
                        if only_preempted:
                            S[UNLOGGED] += fl_i[slot, FL_PRE]
                if S[NFL] == 0:
                    if only_preempted:
                        continue
                    if S[NRUN] == 0 and S[WLEN] == 0 and S[DONE]:
                        S[ENDED] = 1
                        continue
                    code = _wait_for_arrival(S, F, ri, rf, waiting)
                    if code != GO_ON:
                        return code
                    continue
                S[PHASE] = 1
            slot = S[FLFIRST]
            if fl_f[slot, FL_END] >= F[UNTIL]:
                return HORIZON
            S[PHASE] = 0
            S[FLFIRST] = (slot + 1) % 2
            S[NFL] -= 1
            if fl_f[slot, FL_END] > F[NOW]:
                _wait_until(S, F, ri, rf, waiting, fl_f[slot, FL_END])
            _apply(S, F, ri, rf, bk, bt, chead, running, waiting, fl_rid, fl_n, fl_i, fl_f, slot, lg_f, lg_i)
        else:
            if S[PHASE] == 0:
                if not has_requests:
                    if S[DONE]:
                        S[ENDED] = 1
                        continue
                    code = _wait_for_arrival(S, F, ri, rf, waiting)
                    if code != GO_ON:
                        return code
                    continue
                F[CLOCK] = F[NOW]
                if S[DPTR] < len(dl_t) and dl_t[S[DPTR]] <= F[NOW]:
                    _abort_due(S, F, ri, rf, bk, bt, chead, running, waiting, dl_t, dl_rid)
                n_pre, prefill, work, kv_tokens, n_dec, ctx = _schedule(
                    S, F, ri, rf, bk, bt, chead, running, waiting, fl_rid, fl_n, fl_i, 0, hits, skipped)
                if S[ENDED] == 2:
                    return OVERFLOW
                if fl_i[0, FL_CNT] == 0:
                    if fl_i[0, FL_PRE] > 0:
                        S[UNLOGGED] += fl_i[0, FL_PRE]
                        continue
                    if S[NRUN] == 0 and S[WLEN] == 0:
                        continue
                    code = _wait_for_arrival(S, F, ri, rf, waiting)
                    if code != GO_ON:
                        return code
                    continue
                start = F[NOW]
                fl_f[0, FL_START] = start
                fl_f[0, FL_END] = start + _step_time(S, P, dense, head, gc, lc, gg, lg, limits, n_pre, prefill, work,
                                                     kv_tokens, n_dec, ctx)
                S[PHASE] = 1
            if fl_f[0, FL_END] >= F[UNTIL]:
                return HORIZON
            S[PHASE] = 0
            _wait_until(S, F, ri, rf, waiting, fl_f[0, FL_END])
            _apply(S, F, ri, rf, bk, bt, chead, running, waiting, fl_rid, fl_n, fl_i, fl_f, 0, lg_f, lg_i)
