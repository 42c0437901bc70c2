"""NETRT's DICOM listener (SCP): durable receive, study completion, and the flow-run trigger.

Never imports Prefect or ``flows/``: ``netrt serve`` hands it the trigger as a callback.
"""
