"""Monitoring: version-labelled metrics, the production log, Evidently drift reports,
dashboards and alert rules. (Issue 5; nothing here yet.)"""
