"""Integrations with the trainers people already use.

- ``gradlens.integrations.transformers``: ``GradlensCallback`` + ``GradlensTrainerMixin``
  for a ``transformers.Trainer`` whose batches carry named row groups.
- ``gradlens.integrations.trl``: ``GradlensDPOTrainer`` (TRL's ``DPOTrainer`` with
  recording and Balanced-DPO / AdaDPO losses); needs ``pip install 'gradlens[trl]'``.

Submodules are imported on demand, so ``import gradlens`` never imports TRL.
Shared pieces: ``stepper.py`` (one capture per optimizer step across micro-batches)
and ``run_log.py`` (finished steps as rows for ``gradlens.runs.preference_log``, the
run-directory writer ``gradlens record`` uses too, and for the Trainer's own logs).
"""
