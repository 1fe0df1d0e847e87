"""The ServerApp: sampling, rounds, aggregation (through SecAgg+ when on), accounting, progress, the adapter.

It runs in the federation-server pod (Flower's SuperExec starts `flwr-serverapp` there), reads the
ServerConfig the run names (run config `server-config`), and talks to the sites only through Flower's
Grid, with Flower's legacy message types (get_properties, fit, evaluate) so that Flower's
SecAggPlusWorkflow can run the fit exchange unchanged:

    hello        every SuperNode says which site it is (a node that says nothing is never sampled)
    init         one site sends the adapter's seeded initialisation (A random from the seed, B zero)
    round r      sample max(minSites, ⌈fractionFit · online⌉) sites; fit (SecAgg+ or plain) with a
                 timeout; >= minSites replies: aggregate, apply, record; fewer: retry the round
    last         evaluate the final adapter at every site (and, when the policy requires them, the sites'
                 bias and pii checks on their own data: numbers only); write it with the trainer's manifest
    done         tell every site the federation is over (their SuperNodes exit)
"""

from __future__ import annotations

import json
import math
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.common import Code, EvaluateIns, FitIns, GetPropertiesIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import MessageTypeLegacy
from flwr.compat.common import recorddict_compat as compat

from .. import adapter as adapter_io
from .. import storage

from ..logs import get_logger
from . import aggregation as agg
from . import privacy
from .config import (REMOTE_NODES_PATH, ROUND_ATTEMPTS, FederationProgress, FinalAdapter, ServerConfig,
                     federation_dataset_digest)
from .grid import PollingGrid
from .processes import load
from .wire import arrays_from_bytes, arrays_to_bytes

log = get_logger("federation.server")
SERVER_CONFIG_KEY = "server-config"
AUDIT_DIR_KEY = "audit-dir"


def now_iso() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RoundFailed(RuntimeError):
    pass


def final_evaluation_of(evals: list[dict]):
    """The final adapter and the base model on every reporting site's eval split (numbers the sites
    computed), and both weighted by eval examples over the union: what the gate's evaluation compares."""
    from finetune_operator.api.federated import FinalEvaluation, SiteEvaluation

    sites = []
    for e in sorted(evals, key=lambda e: e["site"]):
        loss, base, n = e.get("evalLoss"), e.get("baseEvalLoss"), e.get("evalExamples") or 0
        if isinstance(loss, float) and math.isfinite(loss) and n > 0:
            sites.append(SiteEvaluation(site=e["site"], evalLoss=loss, evalExamples=int(n),
                                        baseEvalLoss=base if isinstance(base, float) and math.isfinite(base) else None))
    both = [s for s in sites if s.baseEvalLoss is not None]
    weight = sum(s.evalExamples for s in both)
    return FinalEvaluation(
        sites=sites,
        heldOutLoss=sum(s.evalLoss * s.evalExamples for s in both) / weight if weight else None,
        baseHeldOutLoss=sum((s.baseEvalLoss or 0.0) * s.evalExamples for s in both) / weight if weight else None)


def rounds_uri(output_uri: str, round_: int) -> str:
    """The global adapter after each round (round 0: the initialisation), for audit and resumption."""
    return storage.join(output_uri, "federation", "rounds", f"round-{round_:04d}.safetensors")


def adapter_config_uri(output_uri: str) -> str:
    """The adapter_config.json of the initialisation: what a restarted server needs besides the weights."""
    return storage.join(output_uri, "federation", "rounds", "adapter_config.json")


def admit(node: int, claimed: str, known: set[str], remote_sites: set[str],
          remote_nodes: Optional[dict[int, str]]) -> tuple[Optional[str], str]:
    """Which site a node that says it is `claimed` may be: (site, "") or (None, why not).

    `remote_nodes` (node id -> remote site, from the SuperLink: the nodes holding a listed key) is None
    when no participant is remote. A node holding a remote site's key is that site and nothing else; a
    remote site's name is never taken on a node's word."""
    mapped = (remote_nodes or {}).get(node)
    if mapped is not None and claimed != mapped:
        return None, f"a node with remote site {mapped}'s key says it is {claimed[:64]!r}"
    if claimed not in known:
        return None, "unknown_site"
    if mapped is None and claimed in remote_sites:
        return None, f"a node without remote site {claimed}'s key says it is {claimed}"
    return claimed, ""


def fetch_remote_nodes(cfg: ServerConfig) -> Optional[dict[int, str]]:
    """The SuperLink's REMOTE_NODES_PATH (node id -> remote site); None when it cannot be read."""
    import httpx

    scheme, verify = ("https", cfg.tls.caFile) if cfg.tls else ("http", False)
    try:
        response = httpx.get(f"{scheme}://{cfg.superlink}{REMOTE_NODES_PATH}", verify=verify, timeout=30)
        response.raise_for_status()
        return {int(node): str(site) for node, site in response.json()["nodes"].items()}
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("remote nodes unknown", extra={"event": "remote_nodes_unavailable", "error": str(exc)[:300]})
        return None


class Federation:
    def __init__(self, cfg: ServerConfig, grid: PollingGrid, context: Context):
        self.cfg, self.grid, self.context = cfg, grid, context
        self.sites: dict[int, str] = {}  # node id -> site name (the newest node of a site wins)
        self.ignored: set[int] = set()  # nodes that did not answer, were replaced, or are no participant
        self.examples: dict[str, int] = {}
        self.known = {s.site for s in cfg.sites}
        self.remote_sites = {s.site for s in cfg.sites if s.remote}
        self.progress = FederationProgress(totalRounds=cfg.rounds, jobUID=cfg.job.uid)
        self.progress.privacy.secureAggregation = cfg.secureAggregation
        if cfg.differentialPrivacy.enabled:
            self.progress.privacy.delta = cfg.differentialPrivacy.delta
            self.progress.privacy.epsilon = 0.0
        self.scaling = cfg.model.lora.alpha / cfg.model.lora.r
        self.names: list[str] = []
        self.global_: agg.Arrays = {}
        self.adapter_config = ""
        self.legacy = None

    # ---- plumbing -------------------------------------------------------------------------------
    def write_progress(self, **changes) -> None:
        for k, v in changes.items():
            setattr(self.progress, k, v)
        self.progress.updatedAt = now_iso()
        storage.write_text(self.cfg.progressURI, self.progress.model_dump_json(indent=1))

    def _exchange(self, kind: str, contents: dict[int, object], round_: int, timeout: float) -> dict[int, Message]:
        """One legacy message per node, replies within `timeout` (errors dropped)."""
        message_type = {"props": MessageTypeLegacy.GET_PROPERTIES, "fit": MessageType.TRAIN,
                        "evaluate": MessageType.EVALUATE}[kind]
        to_record = {"props": compat.getpropertiesins_to_recorddict,
                     "fit": lambda x: compat.fitins_to_recorddict(x, True),
                     "evaluate": lambda x: compat.evaluateins_to_recorddict(x, True)}[kind]
        messages = [Message(content=to_record(ins), dst_node_id=nid, message_type=message_type, group_id=str(round_))
                    for nid, ins in contents.items()]
        replies = {}
        for msg in self.grid.send_and_receive(messages, timeout=timeout):
            if msg.has_error():
                log.warning("site error", extra={"event": "site_error", "node": msg.metadata.src_node_id,
                                                 "site": self.sites.get(msg.metadata.src_node_id),
                                                 "error": str(msg.error.reason)[:500]})
                continue
            replies[msg.metadata.src_node_id] = msg
        return replies

    def hello(self, timeout: float) -> None:
        """Ask nodes we do not know yet which site they are (a remote site's name is bound to its key)."""
        online = set(self.grid.get_node_ids())
        for nid in list(self.sites):
            if nid not in online:
                del self.sites[nid]
        self.ignored &= online
        new = [n for n in online if n not in self.sites and n not in self.ignored]
        if not new:
            return
        replies = self._exchange("props", {n: GetPropertiesIns({"kind": "hello"}) for n in new}, 0, timeout)
        self.ignored |= set(new) - set(replies)  # silent: a node on its way out (its site may come back as a new one)
        remote_nodes: Optional[dict[int, str]] = None
        if self.remote_sites:
            remote_nodes = fetch_remote_nodes(self.cfg)
            if remote_nodes is None:
                return  # cannot tell which nodes hold a remote site's key: admit nobody now, ask again next time
        for nid, msg in replies.items():
            res = compat.recorddict_to_getpropertiesres(msg.content)
            claimed = str(res.properties.get("site", ""))
            site, why = admit(nid, claimed, self.known, self.remote_sites, remote_nodes)
            if site is None:
                if why == "unknown_site":
                    log.warning("a SuperNode that is no participant", extra={"event": why, "site": claimed[:64]})
                else:
                    log.warning(f"SuperNode ignored: {why}", extra={"event": "impersonation", "node": nid,
                                                                    "site": claimed[:64]})
                self.ignored.add(nid)
                continue
            for old in [n for n, s in self.sites.items() if s == site]:
                del self.sites[old]  # the site came back as a new node: its old one is gone
                self.ignored.add(old)
            self.sites[nid] = site
            self.examples[site] = int(res.properties.get("examples", 0))
            log.info("site connected", extra={"event": "site_connected", "site": site, "node": nid})

    def wait_for_sites(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.hello(timeout=min(60.0, max(5.0, deadline - time.monotonic())))
            if len(self.sites) >= count:
                return
            if time.monotonic() >= deadline:
                raise RoundFailed(f"{len(self.sites)} of the {count} sites needed connected within {timeout:.0f}s "
                                  f"(connected: {sorted(self.sites.values())})")
            time.sleep(self.cfg.pollSeconds)

    # ---- the federation ---------------------------------------------------------------------------
    def run(self) -> None:
        cfg = self.cfg
        done = self.resume()
        if done:
            log.info("resumed", extra={"event": "resumed", "after_round": done})
            self.write_progress(state="Training", message=f"resumed after round {done}; waiting for "
                                f"{cfg.minSites} sites")
        else:
            self.write_progress(state="Starting", message=f"waiting for {cfg.minSites} sites")
        self.wait_for_sites(cfg.minSites, cfg.connectTimeoutSeconds)
        if not done:
            self.initialise()
        for round_ in range(done + 1, cfg.rounds + 1):
            self.run_round(round_)
        self.final_evaluation()
        final = self.write_adapter()
        self.write_progress(state="Succeeded", adapter=final, droppedSites=[],
                            message=f"{cfg.rounds} rounds; adapter {final.digest}")
        self.say_done(final)

    def resume(self) -> int:
        """The rounds an earlier server of this federation finished (its pod restarted), restored from
        progress.json and the global adapter it wrote after its last round; 0: start from the beginning.
        The round file is written before progress.json names its round, so the one named is complete."""
        cfg = self.cfg
        try:
            previous = FederationProgress.model_validate_json(storage.read_text(cfg.progressURI))
            if (previous.jobUID != cfg.job.uid or previous.state not in ("Starting", "Training")
                    or previous.totalRounds != cfg.rounds or not 0 < previous.currentRound <= cfg.rounds):
                return 0
            done = previous.currentRound
            weights = arrays_from_bytes(storage.read_bytes(rounds_uri(cfg.outputURI, done)))
            adapter_config = storage.read_text(adapter_config_uri(cfg.outputURI))
        except (FileNotFoundError, ValueError) as exc:  # nothing to resume, or a record we cannot trust
            if not isinstance(exc, FileNotFoundError):
                log.warning("progress not resumed", extra={"event": "resume_refused", "error": str(exc)[:300]})
            return 0
        self.global_ = {k: v.astype(np.float32) for k, v in weights.items()}
        self.names, self.adapter_config = sorted(self.global_), adapter_config
        self.progress.rounds, self.progress.currentRound = previous.rounds, done
        if cfg.differentialPrivacy.enabled:
            self.progress.privacy.epsilon = privacy.epsilon(cfg.differentialPrivacy.noiseMultiplier, done,
                                                            cfg.differentialPrivacy.delta)
        return done

    def initialise(self) -> None:
        nid = min(self.sites)  # any site: the initialisation is a function of the seed and the base model
        replies = self._exchange("props", {nid: GetPropertiesIns({"kind": "init"})}, 0, self.cfg.roundTimeoutSeconds)
        if nid not in replies:
            raise RoundFailed(f"site {self.sites[nid]} sent no initial adapter")
        props = compat.recorddict_to_getpropertiesres(replies[nid].content).properties
        self.global_ = {k: v.astype(np.float32) for k, v in arrays_from_bytes(bytes(props["adapter"])).items()}
        self.names = sorted(self.global_)
        self.adapter_config = str(props["adapter-config"])
        storage.write_bytes(rounds_uri(self.cfg.outputURI, 0), arrays_to_bytes(self.global_))
        storage.write_text(adapter_config_uri(self.cfg.outputURI), self.adapter_config)
        log.info("initial adapter", extra={"event": "init", "site": self.sites[nid], "tensors": len(self.names)})

    def sample(self, round_: int) -> list[int]:
        online = sorted(self.sites)
        k = min(len(online), max(self.cfg.minSites, math.ceil(self.cfg.fractionFit * len(online))))
        return sorted(random.Random(f"{self.cfg.job.uid}-{round_}").sample(online, k))

    def run_round(self, round_: int) -> None:
        cfg = self.cfg
        for attempt in range(1, ROUND_ATTEMPTS + 1):
            started = time.monotonic()
            self.wait_for_sites(cfg.minSites, cfg.roundTimeoutSeconds)
            selected = self.sample(round_)
            self.write_progress(state="Training", message=f"round {round_}: {len(selected)} sites training")
            reports, mean = (self.fit_secure if cfg.secureAggregation else self.fit_plain)(round_, selected)
            if len(reports) >= cfg.minSites and mean is not None:
                break
            dropped = sorted({self.sites.get(n, str(n)) for n in selected} - {r["site"] for r in reports})
            log.warning("round incomplete", extra={"event": "round_incomplete", "round": round_, "attempt": attempt,
                                                   "reported": len(reports), "dropped": dropped})
            self.write_progress(droppedSites=dropped, message=f"round {round_}: only {len(reports)} of "
                                f"{len(selected)} sites reported (minSites {cfg.minSites}); retrying")
        else:
            raise RoundFailed(f"round {round_}: fewer than minSites ({cfg.minSites}) sites reported in "
                              f"{ROUND_ATTEMPTS} attempts")
        self.global_ = agg.apply_update(self.global_, mean, cfg.aggregation, self.scaling, cfg.model.lora.r)
        storage.write_bytes(rounds_uri(cfg.outputURI, round_), arrays_to_bytes(self.global_))
        self.record_round(round_, selected, reports, time.monotonic() - started)

    def _fit_ins(self, round_: int, extra: Optional[dict] = None) -> FitIns:
        config = {"round": round_, "names": json.dumps(self.names), **(extra or {})}
        return FitIns(ndarrays_to_parameters(agg.to_list(self.global_, self.names)), config)

    @staticmethod
    def _report(fitres) -> dict:
        m = fitres.metrics
        nan = lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)  # noqa: E731
        return {"site": str(m.get("site")), "examples": int(m.get("examples", fitres.num_examples)),
                "weight": fitres.num_examples, "localLoss": nan(m.get("local-loss")),
                "evalLoss": nan(m.get("eval-loss")), "evalExamples": int(m.get("eval-examples", 0))}

    def fit_plain(self, round_: int, selected: list[int]) -> tuple[list[dict], Optional[agg.Arrays]]:
        """Every selected site's update arrives on its own; the server averages them."""
        ins = self._fit_ins(round_)
        replies = self._exchange("fit", {n: ins for n in selected}, round_, self.cfg.roundTimeoutSeconds)
        reports, updates, weights = [], [], []
        order = agg.update_names(self.names, self.cfg.aggregation)
        for nid, msg in replies.items():
            fitres = compat.recorddict_to_fitres(msg.content, False)
            if fitres.status.code != Code.OK:
                continue
            reports.append(self._report(fitres))
            updates.append(agg.from_list(parameters_to_ndarrays(fitres.parameters), order))
            weights.append(fitres.num_examples)
        return reports, (agg.weighted_mean(updates, weights) if updates else None)

    def fit_secure(self, round_: int, selected: list[int]) -> tuple[list[dict], Optional[agg.Arrays]]:
        """Flower's SecAgg+: the sites' masked updates sum to the weighted mean; no single one is seen."""
        from flwr.server import LegacyContext, ServerConfig as FlowerServerConfig
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

        cfg, dp = self.cfg, self.cfg.differentialPrivacy
        k = len(selected)
        # Each entry must lie in ±clipping_range before quantization: with DP the clipped update plus
        # the site's noise (8 standard deviations); without, a bound LoRA deltas stay far inside.
        clip = dp.clippingNorm + 8 * privacy.site_noise_std(dp.clippingNorm, dp.noiseMultiplier, cfg.minSites) \
            if dp.enabled else 8.0
        # The sum of k quantized vectors must stay below the modulus (2**32).
        quantization = 2 ** int(31 - math.ceil(math.log2(max(2, k))))
        weight_bound = 1.0 if dp.enabled else float(max([self.examples.get(self.sites[n], 1) for n in selected] + [1]))
        strategy = _GivenClients()
        if self.legacy is None:
            self.legacy = LegacyContext(context=self.context, config=FlowerServerConfig(num_rounds=cfg.rounds),
                                        strategy=strategy)
        legacy = self.legacy
        legacy.strategy = strategy
        for nid in selected:
            if str(nid) not in legacy.client_manager.all():
                legacy.client_manager.register(GridClientProxy(nid, self.grid, self.grid.run.run_id))
        ins = self._fit_ins(round_, {"secagg-range": clip})
        strategy.instructions = [(legacy.client_manager.all()[str(n)], ins) for n in selected]
        record = legacy.state.config_records.get(MAIN_CONFIGS_RECORD) or ConfigRecord()
        record[Key.CURRENT_ROUND] = round_
        record[Key.START_TIME] = time.time()
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = record
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(ins.parameters, True)
        # Shares go to every selected site; more than half of them reconstruct a dropped site's masks (fewer
        # could not be trusted to), so a round of k sites survives k - (k // 2 + 1) dropouts. Two sites: both.
        shares, threshold = (k, min(k - 1, max(2, k // 2 + 1))) if k >= 3 else (1.0, 1.0)
        SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold, max_weight=max(weight_bound, 1.0),
                           clipping_range=float(clip), quantization_range=quantization,
                           timeout=float(cfg.roundTimeoutSeconds))(self.grid, legacy)
        reports = [self._report(fitres) for _, fitres in strategy.results]
        if strategy.aggregate is None:
            return reports, None
        order = agg.update_names(self.names, cfg.aggregation)
        return reports, agg.from_list(parameters_to_ndarrays(strategy.aggregate), order)

    def record_round(self, round_: int, selected: list[int], reports: list[dict], seconds: float) -> None:
        from finetune_operator.api.federated import MAX_STATUS_ROUNDS, RoundStatus, SiteRound

        cfg = self.cfg
        # Each site evaluated the aggregate it started from, i.e. the previous round's.
        self._held_out(round_ - 1, reports)
        entry = RoundStatus(round=round_, sitesSelected=len(selected), sitesReported=len(reports),
                            sites=[SiteRound(site=r["site"], examples=r["examples"], localLoss=r["localLoss"],
                                             evalLoss=r["evalLoss"]) for r in sorted(reports, key=lambda r: r["site"])],
                            seconds=round(seconds, 3))
        rounds = (self.progress.rounds + [entry])[-MAX_STATUS_ROUNDS:]
        if cfg.differentialPrivacy.enabled:
            self.progress.privacy.epsilon = privacy.epsilon(cfg.differentialPrivacy.noiseMultiplier, round_,
                                                            cfg.differentialPrivacy.delta)
        dropped = sorted({self.sites.get(n, str(n)) for n in selected} - {r["site"] for r in reports})
        if dropped:
            log.warning("sites dropped out", extra={"event": "dropout", "round": round_, "sites": dropped})
        self.write_progress(rounds=rounds, currentRound=round_, droppedSites=dropped,
                            message=f"round {round_} of {cfg.rounds}: {len(reports)} of {len(selected)} sites reported")
        log.info("round done", extra={"event": "round", "round": round_, "reported": len(reports),
                                      "selected": len(selected), "seconds": round(seconds, 2)})

    def _held_out(self, round_: int, evals: list[dict]) -> None:
        """heldOutLoss of `round_`'s aggregate: the sites' eval losses weighted by their eval examples."""
        pairs = [(r["evalLoss"], r["evalExamples"]) for r in evals if r["evalLoss"] is not None and r["evalExamples"]]
        entry = next((e for e in self.progress.rounds if e.round == round_), None)
        if entry is not None and pairs:
            entry.heldOutLoss = sum(l * n for l, n in pairs) / sum(n for _, n in pairs)

    def final_evaluation(self) -> None:
        from .site_checks import missing_report, parse_report

        self.hello(timeout=30)
        checks = self.cfg.siteChecks
        config = {"names": json.dumps(self.names)}
        timeout = self.cfg.roundTimeoutSeconds
        if checks.checks:
            config.update({"site-checks": checks.model_dump_json(), "adapter-config": self.adapter_config})
            timeout = max(timeout, checks.timeoutSeconds)
        ins = EvaluateIns(ndarrays_to_parameters(agg.to_list(self.global_, self.names)), config)
        replies = self._exchange("evaluate", {n: ins for n in self.sites}, self.cfg.rounds + 1, timeout)
        evals, reports = [], {}
        for nid, msg in replies.items():
            res = compat.recorddict_to_evaluateres(msg.content)
            if res.status.code == Code.OK and nid in self.sites:
                base = res.metrics.get("base-eval-loss")
                evals.append({"site": self.sites[nid], "evalLoss": float(res.loss), "evalExamples": res.num_examples,
                              "baseEvalLoss": float(base) if isinstance(base, (int, float)) else None})
                if checks.checks and nid in self.sites:  # the site the node said it was, not what the reply claims
                    reports[self.sites[nid]] = parse_report(res.metrics.get("site-checks"), self.sites[nid])
        self._held_out(self.cfg.rounds, evals)
        self.final_evals = evals
        self.progress.finalEvaluation = final_evaluation_of(evals)
        if checks.checks:
            self.progress.siteChecks = [reports.get(s.site) or missing_report(s.site) for s in self.cfg.sites]
            self.write_progress(message=f"site checks ({', '.join(checks.checks)}) from {len(reports)} of "
                                f"{len(self.cfg.sites)} sites")

    def write_adapter(self) -> FinalAdapter:
        """The global adapter with the trainer's manifest: the governance Job checks it like any other."""
        from safetensors.numpy import save_file

        cfg = self.cfg
        held_out = self.progress.rounds[-1].heldOutLoss if self.progress.rounds else None
        adapter_config = json.loads(self.adapter_config)
        if isinstance(adapter_config.get("target_modules"), list):
            adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
        sites = [s.model_dump(mode="json", exclude_none=True) for s in cfg.sites]
        fmt = next((s.format for s in cfg.sites if s.format), None)
        privacy_record = {"secureAggregation": cfg.secureAggregation,
                          "differentialPrivacy": {**cfg.differentialPrivacy.model_dump(mode="json"),
                                                  "epsilon": self.progress.privacy.epsilon}}
        training = {"method": cfg.model.method, "lora": cfg.model.lora.model_dump(mode="json"),
                    "quantization": cfg.model.quantization.model_dump(mode="json") if cfg.model.quantization else None,
                    "training": cfg.model.training.model_dump(mode="json"),
                    "federation": {"rounds": cfg.rounds, "localSteps": cfg.localSteps, "fractionFit": cfg.fractionFit,
                                   "minSites": cfg.minSites, "aggregation": cfg.aggregation,
                                   "privacy": privacy_record}}
        metrics = {"evalLoss": held_out, "rounds": cfg.rounds,
                   "siteEvalLoss": {e["site"]: e["evalLoss"] for e in getattr(self, "final_evals", [])},
                   "privacy": privacy_record}
        if self.progress.siteChecks:
            metrics["siteChecks"] = [r.model_dump(mode="json", exclude_none=True) for r in self.progress.siteChecks]
        with tempfile.TemporaryDirectory(prefix="federated-adapter-") as tmp:
            folder = Path(tmp)
            save_file({n: np.ascontiguousarray(v, dtype=np.float32) for n, v in self.global_.items()},
                      str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
            manifest = adapter_io.build_manifest(
                folder, base_model={"uri": cfg.model.baseModel.uri, "digest": cfg.model.baseModel.digest},
                dataset={"digest": federation_dataset_digest(cfg.sites), "format": fmt, "federation": sites},
                training=training, metrics=metrics)
            result = adapter_io.publish(folder, manifest, cfg.outputURI, run_id=uuid.uuid4().hex[:12], metrics=metrics)
        return FinalAdapter(uri=result["adapterURI"], digest=result["digest"], sizeBytes=result["sizeBytes"])

    def say_done(self, final: FinalAdapter) -> None:
        self.hello(timeout=30)
        if self.sites:
            self._exchange("props", {n: GetPropertiesIns({"kind": "done", "adapter": final.digest})
                                     for n in self.sites}, self.cfg.rounds + 2, 60)


class _GivenClients:
    """The legacy Strategy SecAggPlusWorkflow drives: the clients this round selected, and the sum it reveals."""

    def __init__(self):
        self.instructions: list = []
        self.results: list = []
        self.aggregate = None

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):
        # SecAgg+ set every result's parameters to the unmasked weighted mean; the counts are per site.
        self.results = [(p, r) for p, r in results if r.status.code == Code.OK]
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


def main(grid, context: Context) -> None:
    cfg = load(str(context.run_config[SERVER_CONFIG_KEY]), ServerConfig)
    audit = str(context.run_config.get(AUDIT_DIR_KEY, "") or "") or None
    federation = Federation(cfg, PollingGrid(grid, cfg.pollSeconds, audit), context)
    try:
        federation.run()
    except Exception as exc:
        log.exception(f"federation failed: {exc}", extra={"event": "failed"})
        federation.write_progress(state="Failed", message=str(exc)[:1000])
        raise
