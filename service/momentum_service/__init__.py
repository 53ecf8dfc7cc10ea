"""momentum-service: a parameter server applying torch.optim.SGD's momentum rule over HTTP."""

__version__ = "0.1.0"
