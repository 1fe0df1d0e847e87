"""`ftctl`: run the fine-tuning pipeline on one machine, or drive it on a cluster.

Local runs (`ftctl run`) execute the same trainer commands and the same decision
functions as the operator; only the executor differs (subprocesses instead of Jobs).
"""
