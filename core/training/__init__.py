"""Training and evaluation, off the serving path: ``mmq train`` (fine-tuned model
versions: finetune.py, labelled.py), labelled datasets built locally, sample sentences
for tests and benchmarks, and the photographs the image tower is evaluated on."""
