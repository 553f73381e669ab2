"""Recording: scoped hooks and the streaming recorder."""

from neuronatlas.record.hooks import count_hooks, site_hooks
from neuronatlas.record.recorder import RecordConfig, RecordResult, load_record, record

__all__ = ["RecordConfig", "RecordResult", "count_hooks", "load_record", "record", "site_hooks"]
