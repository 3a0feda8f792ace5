"""Retraining on Ray (installed as `asrops.retrain`).

- trigger.py: when a retrain starts (drift verdict, live feedback WER, schedule, by hand) and
  its submission as a Ray job;
- job.py: one retrain, start to end: data, fine-tuning, the gate, publish and canary;
- dataset.py: labelled clips validated, split (never a template across splits) and reported;
- train.py: the fine-tuning loop on Ray Train, in stages that also run without Ray;
- evaluate.py: the gate: candidate against stable with paired bootstrap intervals;
- scenario.py: the drift scenario end to end (`python -m asrops.retrain.scenario`).
"""
