"""compute.market: the job market, both sides of it, with no coordinator anywhere.

Where things live (built like ``consensus/``: pure decisions, thin drivers):
- ``_service``: ``MarketService``, the one service the node composes: a thin shell that wires
  the two roles' stream handlers (behind a fault barrier) and delegates the public API.
- ``_requester``: ``Requester``, the requester side (submit, bids, award, lock, watch, cancel).
- ``_provider``: ``Provider`` and ``ProviderSide``, the provider side (requests, bids, awards,
  running the job).
- ``_exchange``: the output and settle flow of both sides (``ProviderExchange`` serves outputs
  and settles, ``RequesterExchange`` fetches and checks them).
- ``_protocol``: every protocol decision as a pure function (bid admission and acceptance,
  award acceptance, what a trade's state means for each side), and ``attempt_job_id``.
- ``_checks``: pure manifest and input-name checks, run on both sides.
- ``_logs``: live logs (``PROTOCOL_LOG_TAIL``): the requester pulls a running job's stdout and
  stderr from its offsets, keeps a bounded tail and tells subscribers of each chunk.
- ``_transfers``: chunked, content-addressed input and output transfers.
- ``_wire``: protocol names, decoding what peers send, the per-request fault barrier.
- ``_context``: what both roles share (seams, events) and one role's records and drivers.
- ``types``: wire messages (``JobRequest``, ``Bid``, ``Award``, ``CancelNotice``, ...), the
  stored ``JobRecord`` with its ``JobState``, ``JobSubmission``, ``MarketConfig``.
- ``_store``: ``JobStore``, every job in LevelDB (one schema).
- ``_matching``: pure decisions: does a node fit a job, why nothing fits, bid ranking.
- ``abc``: ``MarketNetAPI`` and ``ChainAPI``, the seams the node implements; ``Incoming``.
- ``exceptions``: ``MarketError`` and its subclasses.
- ``testing``: ``LocalChain``, a real single-sequencer chain over the real ledger for tests.

compute.market imports ``ledger`` and ``compute`` only; the node adapts p2p and the chain.
"""

from compute.market._exchange import ProviderExchange, RequesterExchange
from compute.market._logs import LogEvent, LogsView
from compute.market._matching import explain_unsatisfiable, fit_on_node, rank_bids
from compute.market._provider import Provider
from compute.market._requester import Requester
from compute.market._service import (
    JOBS_PURPOSE,
    PROTOCOL_AWARD,
    PROTOCOL_BID,
    PROTOCOL_CANCEL,
    PROTOCOL_INPUT,
    PROTOCOL_LOGS,
    PROTOCOL_OUTPUT,
    PROTOCOL_OUTPUTS,
    PROTOCOL_STATUS,
    MarketService,
    ProviderSide,
    attempt_job_id,
)
from compute.market._store import JobStore
from compute.market.abc import ChainAPI, Incoming, MarketNetAPI
from compute.market.exceptions import (
    ChainRejected,
    InvalidManifest,
    InvalidSubmission,
    JobNotReady,
    MarketError,
    NetError,
    StoreCorrupt,
    StoreFormatError,
    UnknownJob,
    Unsatisfiable,
)
from compute.market.types import (
    STRATEGIES,
    Award,
    Bid,
    CancelNotice,
    JobManifest,
    JobRecord,
    JobRequest,
    JobResultView,
    JobState,
    JobSubmission,
    MarketConfig,
    Requirements,
    Role,
    outputs_bytes_default,
)

__all__ = [
    "JOBS_PURPOSE",
    "PROTOCOL_AWARD",
    "PROTOCOL_BID",
    "PROTOCOL_CANCEL",
    "PROTOCOL_INPUT",
    "PROTOCOL_LOGS",
    "PROTOCOL_OUTPUT",
    "PROTOCOL_OUTPUTS",
    "PROTOCOL_STATUS",
    "STRATEGIES",
    "Award",
    "Bid",
    "CancelNotice",
    "ChainAPI",
    "ChainRejected",
    "Incoming",
    "InvalidManifest",
    "InvalidSubmission",
    "JobManifest",
    "JobNotReady",
    "JobRecord",
    "JobRequest",
    "JobResultView",
    "JobState",
    "JobStore",
    "JobSubmission",
    "LogEvent",
    "LogsView",
    "MarketConfig",
    "MarketError",
    "MarketNetAPI",
    "MarketService",
    "NetError",
    "Provider",
    "ProviderExchange",
    "ProviderSide",
    "Requester",
    "RequesterExchange",
    "Requirements",
    "Role",
    "StoreCorrupt",
    "StoreFormatError",
    "UnknownJob",
    "Unsatisfiable",
    "attempt_job_id",
    "explain_unsatisfiable",
    "fit_on_node",
    "outputs_bytes_default",
    "rank_bids",
]
