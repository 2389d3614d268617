"""Everything BentoML: the service, its HTTP handling, the model store and a local-serve runner.

Imports run one way: serving uses the core (`vit_service.model`, `artifact`, `preprocessing`,
`inference`); the core never imports serving.
"""
