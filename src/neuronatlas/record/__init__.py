"""Recording: scoped hooks, the streaming prompt recorder, and the corpus exemplar stream with its
mergeable statistics (``WindowTopK``, ``Reservoir``) beside it."""

from neuronatlas.record.corpus import ExemplarStream
from neuronatlas.record.exemplar_stats import Reservoir, WindowTopK
from neuronatlas.record.hooks import count_hooks, site_hooks
from neuronatlas.record.recorder import RecordConfig, RecordResult, load_record, record

__all__ = ["ExemplarStream", "RecordConfig", "RecordResult", "Reservoir", "WindowTopK", "count_hooks", "load_record",
           "record", "site_hooks"]
