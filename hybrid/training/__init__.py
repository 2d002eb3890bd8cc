"""The training pieces train_gpt.py puts together around a model.

- settings.py    parsing and checking every setting before the first step (SettingError)
- optim.py       Newton–Schulz, Muon, parameter groups, EMA
- schedule.py    LR warmdown, Muon momentum warm-up, the late-QAT switch
- evaluate.py    sliding-window evaluation (val_loss, val_bpb)
- stateful.py    stateful evaluation driver for recurrent models
- ttt.py         legal score-first test-time training at the final evaluation (TTT=sgd), loaded on use
- ttt_lora.py    score-first per-document LoRA test-time training (TTT=lora), loaded on use
- checkpoint.py  resumable checkpoints, the final weights saved before packing, resume checks

Import modules directly; this file re-exports nothing (a run's counted code is what it imports).
"""
