"""dreambooth-operator: a kopf operator that runs DreamBooth fine-tuning jobs on Kubernetes."""
