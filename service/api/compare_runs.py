"""Compare runs in Redis: create one (its jobs go through the normal queue), read its progress and scores, export it,
and the blind votes. Runs and their jobs' results persist for `T2I_COMPARE_TTL_S`, so they survive API restarts.

Scores are computed here, with numpy, once every job of a cell (one prompt and seed) has ended, and then kept in the
run's cells hash: a finished run is read, not recomputed.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import random
import secrets
import time
from collections import defaultdict
from itertools import combinations

import numpy as np
from PIL import Image

from service import metrics, queue
from service.api.queue_client import ANONYMOUS, QueueClient
from service.compare import (
    Cell,
    CompareParams,
    CompareSummary,
    CompareView,
    EncoderResult,
    EncoderSummary,
    PairSummary,
    PairView,
    embedding_cosine,
    evaluator_scores,
    percentile,
    psnr,
    ssim,
    to_unit,
    wilson,
)
from service.errors import NotFoundError
from service.jobs import JobStatus, decode_hash

CSV_COLUMNS = ("run_id", "prompt_index", "prompt", "seed", "encoder", "reference", "status", "psnr", "ssim",
               "embedding_cosine", "evaluator_correct", "encode_s", "total_s", "peak_memory_bytes", "job_id", "error")


class CompareRuns:
    def __init__(self, queue_client: QueueClient, *, ttl_s: int, owner: str = ANONYMOUS):
        """Runs of one owner (an API key): another key's runs are not found."""
        self.queue = queue_client
        self.client = queue_client.client
        self.ttl_s = ttl_s
        self.owner = owner

    # -- creating ----------------------------------------------------------------------------------------------
    async def create(self, params: CompareParams, prompts: list[str], encoders: list[str], reference: str,
                     request: dict, routed: dict[str, list[dict]] | None = None) -> str:
        """Enqueue every prompt x seed x encoder job (same seed, so the same initial noise, for every encoder) and
        store the run. `request` is the generation request every job shares, less prompt, encoder and seed.
        `routed[column][i]`: a route column's decision for prompt i (its jobs run on the encoder decided)."""
        routed = routed or {}
        run_id = secrets.token_urlsafe(12)
        jobs: dict[str, dict[str, str]] = {}
        enqueued: list[str] = []
        try:
            for i, prompt in enumerate(prompts):
                for seed in params.seeds:
                    cell = jobs.setdefault(f"{i}:{seed}", {})
                    for encoder in encoders:
                        job = {**request, "prompt": prompt, "encoder": encoder, "seed": seed}
                        if encoder in routed:
                            job.update(encoder=routed[encoder][i]["encoder"], routing=routed[encoder][i])
                        job_id = (await self.queue.enqueue(job, result_ttl_s=self.ttl_s, keep_embedding=True,
                                                           owner=self.owner)).id
                        if encoder in routed:
                            decision = routed[encoder][i]
                            metrics.ROUTE_DECISIONS.labels(decision["route"], decision["encoder"],
                                                           decision["reason"]).inc()
                        cell[encoder] = job_id
                        enqueued.append(job_id)
        except Exception:
            for job_id in enqueued:  # all or nothing: a run with holes would mislead
                await self.queue.cancel(job_id)
            raise
        run = {"id": run_id, "title": params.title, "created_at": time.time(), "pipeline": params.pipeline,
               "prompt_set": params.prompt_set, "prompts": prompts, "seeds": params.seeds, "encoders": encoders,
               "reference": reference, "jobs": jobs, "routes": sorted(routed), "params": params.model_dump(exclude={"control"}),
               "owner": self.owner}
        pipe = self.client.pipeline(transaction=True)
        pipe.set(queue.compare_key(run_id), json.dumps(run), ex=self.ttl_s)
        pipe.zadd(queue.COMPARES, {run_id: run["created_at"]})
        await pipe.execute()
        metrics.COMPARE_RUNS.inc()
        return run_id

    # -- reading -----------------------------------------------------------------------------------------------
    async def run(self, run_id: str) -> dict:
        raw = await self.client.get(queue.compare_key(run_id))
        run = json.loads(raw) if raw is not None else None
        if run is None or run.get("owner", ANONYMOUS) != self.owner:
            raise NotFoundError(f"compare run {run_id!r} not found (unknown or expired)", field="run_id")
        return run

    async def list(self, limit: int = 50) -> list[CompareSummary]:
        ids = [i.decode() for i in await self.client.zrevrange(queue.COMPARES, 0, limit - 1)]
        out = []
        for run_id in ids:
            raw = await self.client.get(queue.compare_key(run_id))
            if raw is None:  # expired
                await self.client.zrem(queue.COMPARES, run_id)
                continue
            run = json.loads(raw)
            if run.get("owner", ANONYMOUS) != self.owner:
                continue
            statuses = await self._statuses(run)
            out.append(self._summary_fields(run, statuses))
        return out

    async def view(self, run_id: str, base_url: str) -> CompareView:
        run = await self.run(run_id)
        statuses = await self._statuses(run)
        cells = await self._cells(run, statuses, base_url)
        workers = await self.queue.live_workers()
        facts_of: dict[str, dict] = {}  # params, bytes and quantization of each encoder, as its workers report them
        for worker in workers:
            for name, facts in worker["encoders"].items():
                facts_of.setdefault(name, facts)
        return CompareView(
            **self._summary_fields(run, statuses).model_dump(), prompt_set=run["prompt_set"],
            prompt_list=run["prompts"], cells=cells, summary=_encoder_summaries(run, cells, facts_of),
            votes=await self.vote_summary(run))

    def _summary_fields(self, run: dict, statuses: dict[str, str]) -> CompareSummary:
        done = sum(JobStatus(s).terminal for s in statuses.values())
        failed = sum(s in ("failed", "cancelled") for s in statuses.values())
        return CompareSummary(
            id=run["id"], title=run["title"], status="done" if done == len(statuses) else "running",
            created_at=run["created_at"], pipeline=run["pipeline"], encoders=run["encoders"],
            reference=run["reference"], prompts=len(run["prompts"]), seeds=run["seeds"], jobs_total=len(statuses),
            jobs_done=done, jobs_failed=failed)

    async def _statuses(self, run: dict) -> dict[str, str]:
        job_ids = [j for cell in run["jobs"].values() for j in cell.values()]
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(queue.job_key(job_id), "status")
        return {j: (s.decode() if s else "failed") for j, s in zip(job_ids, await pipe.execute())}

    async def _cells(self, run: dict, statuses: dict[str, str], base_url: str) -> list[Cell]:
        cached = {k.decode(): v for k, v in (await self.client.hgetall(queue.compare_cells_key(run["id"]))).items()}
        cells = []
        for key, jobs in run["jobs"].items():
            i, seed = (int(x) for x in key.split(":"))
            if key in cached:
                results = {e: EncoderResult.model_validate(r) for e, r in json.loads(cached[key]).items()}
                done = True
            else:
                done = all(JobStatus(statuses[j]).terminal for j in jobs.values())
                results = await self._score_cell(run, jobs, run["prompts"][i], base_url, final=done)
                if done:
                    await self.client.hset(queue.compare_cells_key(run["id"]), key, json.dumps(
                        {e: r.model_dump() for e, r in results.items()}))
                    await self.client.expire(queue.compare_cells_key(run["id"]), self.ttl_s)
            cells.append(Cell(prompt_index=i, prompt=run["prompts"][i], seed=seed, done=done, results=results))
        return cells

    async def _score_cell(self, run: dict, jobs: dict[str, str], prompt: str, base_url: str,
                          final: bool) -> dict[str, EncoderResult]:
        """Each encoder's job of one cell, scored against the reference once both have ended."""
        fields = {e: decode_hash(await self.client.hgetall(queue.job_key(j))) for e, j in jobs.items()}
        images: dict[str, Image.Image] = {}
        embeddings: dict[str, np.ndarray] = {}
        results: dict[str, EncoderResult] = {}
        for encoder, job_id in jobs.items():
            f = fields[encoder]
            status = f.get("status", "failed")
            timings = json.loads(f.get("timings", "{}"))
            ran_on = json.loads(f["request"])["encoder"] if "request" in f else None
            result = EncoderResult(
                job_id=job_id, status=status, error=f.get("error"), encode_s=timings.get("encode"),
                total_s=timings.get("total"),
                peak_memory_bytes=int(f["peak_memory_bytes"]) if f.get("peak_memory_bytes") else None,
                ran_on=ran_on if ran_on != encoder else None)
            if status == JobStatus.succeeded.value:
                result.image = f"{base_url}/v1/jobs/{job_id}/images/0"
                if final:
                    data = await self.queue.image(job_id, 0)
                    if data is not None:
                        images[encoder] = Image.open(io.BytesIO(data)).convert("RGB")
                    raw = await self.client.get(queue.embedding_key(job_id))
                    if raw is not None and f.get("embedding_shape"):
                        shape = tuple(int(x) for x in f["embedding_shape"].split(","))
                        embeddings[encoder] = np.frombuffer(raw, dtype=np.float16).reshape(shape)
            results[encoder] = result
        if final:
            await asyncio.to_thread(_score, results, images, embeddings, run["reference"], prompt)
        return results

    # -- export ------------------------------------------------------------------------------------------------
    async def csv(self, run_id: str, base_url: str) -> str:
        view = await self.view(run_id, base_url)
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for cell in view.cells:
            for encoder, r in cell.results.items():
                writer.writerow({
                    "run_id": view.id, "prompt_index": cell.prompt_index, "prompt": cell.prompt, "seed": cell.seed,
                    "encoder": encoder, "reference": view.reference, "status": r.status, "psnr": r.psnr,
                    "ssim": r.ssim, "embedding_cosine": r.embedding_cosine,
                    "evaluator_correct": None if r.evaluator is None else all(r.evaluator.values()),
                    "encode_s": r.encode_s, "total_s": r.total_s, "peak_memory_bytes": r.peak_memory_bytes,
                    "job_id": r.job_id, "error": r.error})
        return out.getvalue()

    # -- blind votes -------------------------------------------------------------------------------------------
    async def pair(self, run_id: str, voter: str, base_url: str) -> PairView | None:
        """A random pair of two encoders' images of one finished cell that this voter has not voted on; None when
        there is none left. The sides are randomised and the encoders are named only inside the stored token."""
        run = await self.run(run_id)
        statuses = await self._statuses(run)
        voted = {k.decode().split("|", 1)[1] for k in await self.client.hkeys(queue.compare_votes_key(run_id))
                 if k.decode().startswith(voter + "|")}
        open_pairs = []
        for key, jobs in run["jobs"].items():
            ok = sorted(e for e, j in jobs.items() if statuses[j] == JobStatus.succeeded.value)
            for a, b in combinations(ok, 2):
                if f"{key}|{a}|{b}" not in voted:
                    open_pairs.append((key, a, b))
        if not open_pairs:
            return None
        key, a, b = random.choice(open_pairs)
        left, right = random.sample([a, b], 2)
        token = secrets.token_urlsafe(12)
        await self.client.set(queue.compare_pair_key(run_id, token),
                              json.dumps({"cell": key, "left": left, "right": right}), ex=self.ttl_s)
        i, seed = (int(x) for x in key.split(":"))
        jobs = run["jobs"][key]
        return PairView(token=token, prompt=run["prompts"][i], seed=seed,
                        left=f"{base_url}/v1/compare/{run_id}/pairs/{token}/left",
                        right=f"{base_url}/v1/compare/{run_id}/pairs/{token}/right", remaining=len(open_pairs))

    async def pair_image(self, run_id: str, token: str, side: str) -> bytes:
        pair = await self._pair(run_id, token)
        run = await self.run(run_id)
        data = await self.queue.image(run["jobs"][pair["cell"]][pair[side]], 0)
        if data is None:
            raise NotFoundError(f"the {side} image of pair {token!r} has expired", field="token")
        return data

    async def _pair(self, run_id: str, token: str) -> dict:
        await self.run(run_id)  # 404 for an unknown run first
        raw = await self.client.get(queue.compare_pair_key(run_id, token))
        if raw is None:
            raise NotFoundError(f"pair {token!r} of compare run {run_id!r} not found", field="token")
        return json.loads(raw)

    async def vote(self, run_id: str, token: str, choice: str, voter: str) -> bool:
        """Record a vote; False (not counted again) when this voter already voted on this pair."""
        pair = await self._pair(run_id, token)
        a, b = sorted((pair["left"], pair["right"]))
        winner = "tie" if choice == "tie" else pair[choice]
        outcome = "tie" if winner == "tie" else ("a" if winner == a else "b")
        counted = await self.client.hsetnx(queue.compare_votes_key(run_id), f"{voter}|{pair['cell']}|{a}|{b}",
                                           outcome)
        await self.client.expire(queue.compare_votes_key(run_id), self.ttl_s)
        if counted:
            metrics.AB_VOTES.labels(a, b, outcome).inc()
        return bool(counted)

    async def vote_summary(self, run: dict) -> list[PairSummary]:
        counts: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: {"a": 0, "b": 0, "tie": 0})
        for key, outcome in (await self.client.hgetall(queue.compare_votes_key(run["id"]))).items():
            _voter, _cell, a, b = key.decode().rsplit("|", 3)
            counts[(a, b)][outcome.decode()] += 1
        out = []
        for (a, b), c in sorted(counts.items()):
            n = c["a"] + c["b"] + c["tie"]
            low, high = wilson(c["a"] + c["tie"] / 2, n)
            out.append(PairSummary(a=a, b=b, votes=n, a_wins=c["a"], b_wins=c["b"], ties=c["tie"],
                                   a_win_rate=(c["a"] + c["tie"] / 2) / n, ci_low=low, ci_high=high))
        return out


def _score(results: dict[str, EncoderResult], images: dict[str, Image.Image], embeddings: dict[str, np.ndarray],
           reference: str, prompt: str) -> None:
    ref_image = to_unit(images[reference]) if reference in images else None
    for encoder, result in results.items():
        if encoder not in images:
            continue
        result.evaluator = evaluator_scores(prompt, images[encoder])
        if encoder == reference or ref_image is None:
            continue
        image = to_unit(images[encoder])
        if image.shape == ref_image.shape:
            result.psnr, result.ssim = psnr(image, ref_image), ssim(image, ref_image)
        if encoder in embeddings and reference in embeddings:
            result.embedding_cosine = embedding_cosine(embeddings[encoder], embeddings[reference])


def _encoder_summaries(run: dict, cells: list[Cell], facts: dict[str, dict]) -> list[EncoderSummary]:
    out = []
    for encoder in run["encoders"]:
        rows = [c.results[encoder] for c in cells if encoder in c.results]
        ok = [r for r in rows if r.status == JobStatus.succeeded.value]
        mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
        judged = [r.evaluator for r in ok if r.evaluator is not None]
        encode = [r.encode_s for r in ok if r.encode_s is not None]
        total = [r.total_s for r in ok if r.total_s is not None]
        memory = [r.peak_memory_bytes for r in ok if r.peak_memory_bytes is not None]
        facts_of = facts.get(encoder, {})
        routed = None
        if encoder in run.get("routes", []):  # a route's column: what it chose, and the mean bytes paid per job
            ran = [r.ran_on or encoder for r in rows]
            routed = {name: ran.count(name) for name in sorted(set(ran))}
            sizes = [facts.get(name, {}).get("bytes") for name in ran]
            facts_of = {"bytes": round(float(np.mean(sizes))) if sizes and None not in sizes else None}
        out.append(EncoderSummary(
            encoder=encoder, is_reference=encoder == run["reference"], jobs=len(rows), succeeded=len(ok),
            failed=sum(r.status in ("failed", "cancelled") for r in rows),
            psnr=mean([r.psnr for r in ok if r.psnr is not None]),
            ssim=mean([r.ssim for r in ok if r.ssim is not None]),
            embedding_cosine=mean([r.embedding_cosine for r in ok if r.embedding_cosine is not None]),
            accuracy=mean([float(all(j.values())) for j in judged]),
            encode_p50_s=percentile(encode, 50), encode_p95_s=percentile(encode, 95),
            job_p50_s=percentile(total, 50), job_p95_s=percentile(total, 95),
            peak_memory_bytes=max(memory) if memory else None, params=facts_of.get("params"),
            bytes=facts_of.get("bytes"), quantization=facts_of.get("quantization"), routed=routed))
    return out
