"""The fleet: the replicas, what is known of each (health, load, breakers, LoRA slots, KV
events), and how the set of replicas changes (reload, admin registration, discovery)."""
