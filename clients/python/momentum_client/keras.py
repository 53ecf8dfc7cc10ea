"""A Keras 3 optimizer whose updates happen on a momentum-service server: :class:`RemoteSGD`.

``RemoteSGD`` takes the place of ``keras.optimizers.SGD`` (same arguments, plus where the server
is and which model to train) in ``model.compile(optimizer=...)`` + ``model.fit`` and in custom
loops that call ``optimizer.apply_gradients(zip(grads, model.trainable_variables))``::

    import keras
    from momentum_client.keras import RemoteSGD

    model.compile(
        optimizer=RemoteSGD(learning_rate=0.01, momentum=0.9, model="mlp", url="http://localhost:8000"),
        loss="mse",
    )
    model.fit(x, y, batch_size=32, epochs=10)

The model on the server uses the ``keras`` rule, which rounds as Keras 3 on TensorFlow does, so
the weights are those of ``keras.optimizers.SGD`` on TensorFlow whatever backend computes the
gradients. Keras' own SGD on the torch backend rounds differently (fused ``torch._foreach`` ops):
after 200 steps of a small float32 MLP, weights up to ~2 differed by 4.8e-7 (1.9e-6 with nesterov).

**What a step does.** Every ``apply`` (which ``apply_gradients`` and the torch trainer's
``fit`` both call) clips the gradients if asked (``clipnorm``, ``clipvalue`` or
``global_clipnorm``), undoes ``loss_scale_factor``, sends every gradient in one request, assigns
the values the server returns into the variables in place and advances ``iterations`` by one.
Keras' ``update_step`` never runs; the velocity lives on the server only (the optimizer has no
momentum variables). Gradients that are ``None`` are skipped, with Keras' warning.

**The first step** (or :meth:`RemoteSGD.connect`, to do it before training) creates the model
on the server if it is missing (``create=True``), uploads the values of the parameters the server
does not have yet, and assigns the server's values into the variables: several workers can
start at once, and they all continue from the same values. A worker that joins a model already
trained elsewhere should call ``optimizer.connect(model.trainable_variables)`` before training,
so that its first gradient is computed on the server's values rather than on its own initial ones.

**Names.** Each variable is the parameter named by its ``variable.path`` with ``/`` replaced by
``.`` (``sequential/dense/kernel`` -> ``sequential.dense.kernel``). Workers share parameters by
name, so they must build the same model with the same layer names (name the layers to be safe:
Keras numbers unnamed layers per process, ``dense``, ``dense_1``, ...). A path says where the
variable was built: ``keras.models.load_model`` gives ``hidden/kernel`` to the variable that was
``net/hidden/kernel`` in the model saved, so build the model in code and ``load_weights``. A
model on the server that has parameters but not these names is refused (``ValueError``) rather
than trained as a second, separate copy.

**Learning rate.** The optimizer's learning rate (a float, a ``LearningRateSchedule`` evaluated
at ``iterations``, or a callable), as Keras computes it for the coming step, is the one the step
uses: when it differs from the model's lr on the server (compared in float32, as the rule uses
it), one more request, ``update_model(model, lr=...)``, precedes the step. A constant lr costs
that request never; a schedule costs it at every step where its float32 value changes
(``ExponentialDecay`` without ``staircase``: every step). Callbacks that set
``optimizer.learning_rate`` (``ReduceLROnPlateau``, ``LearningRateScheduler``) work the same way.

**Several workers** share one model and therefore one lr. Each worker sets it to its own
schedule's value (at its own ``iterations``) before its own steps, and a step uses the lr the
model has when the server applies it. The same constant lr on every worker is exact. With
schedules, workers at different ``iterations`` (one started later, or restarted: ``iterations``
starts at 0 again unless restored) set different values, the last one set wins and the lr can
flip between them at every step, each flip one more request; and between one worker's
``update_model`` and its step, another's may land. Give every worker the same constant lr, or
drive the lr from one place. The model's other hyperparameters are the server's: ``momentum``,
``nesterov`` and ``weight_decay`` are used to create the model; if it exists with other values,
``create_model`` warns (:class:`momentum_client.ModelConfigWarning`) and the server's apply.

**Not supported** (``ValueError``): ``use_ema`` (the model's values live on the server; a local
average overwriting them would not reach it), ``gradient_accumulation_steps``, variables with a
``constraint`` (the server would keep the unconstrained value), ``exclude_from_weight_decay``
with a weight decay (the rule decays every parameter of the model), variables neither float32
nor float64, and a server model with another rule than ``keras``, with a server-side
learning-rate schedule, or in ``sync`` or ``bounded`` mode (RemoteSGD sends plain ``async`` steps).

**Backends.** Tested on the torch backend. The code uses only ``keras.ops`` and numpy, so custom
loops calling ``apply_gradients`` eagerly should work on any backend; ``fit`` on TensorFlow or JAX
compiles the train step, which a network round trip cannot be part of: use ``run_eagerly=True``
(untested).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import keras  # type: ignore[import-untyped]
import numpy as np
import numpy.typing as npt

from ._client import Client, check_server_arguments

__all__ = ["RemoteSGD"]

# The server's parameter names (service/momentum_service/api/schemas.py PARAM_NAME_PATTERN).
_PARAM_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,255}")


def _to_numpy(x: Any, dtype: str | None = None) -> npt.NDArray[Any]:
    """A tensor (or a Keras variable) as a numpy array, in ``dtype`` if given."""
    if isinstance(x, keras.Variable):
        x = x.value
    if dtype is not None and keras.backend.standardize_dtype(x.dtype) != dtype:
        x = keras.ops.cast(x, dtype)
    if hasattr(x, "detach") and hasattr(x, "numpy"):
        # A torch tensor: keras.ops.convert_to_numpy would np.array() it, which numpy 2 warns about.
        array: npt.NDArray[Any] = x.detach().cpu().numpy()
        return array
    return np.asarray(keras.ops.convert_to_numpy(x))


def _wire_lr(value: Any) -> float:
    """The learning rate Keras computed, as the float to send: a float32 lr as the shortest decimal
    that rounds back to it (``0.01``, not ``0.009999999776482582``), as the rule rounds lr to float32."""
    array = _to_numpy(value)
    if array.dtype == np.float32:
        return float(str(array.reshape(())[()]))
    return float(array)


@keras.saving.register_keras_serializable(package="momentum_client")
class RemoteSGD(keras.optimizers.Optimizer):  # type: ignore[misc]
    """``keras.optimizers.SGD`` whose updates the server applies; see the module docstring.

    The Keras arguments are those of ``keras.optimizers.SGD``, validated the same way. Then:

    ``model``: the model's name on the server. ``client``: a :class:`momentum_client.Client` to
    use (it stays open, and is not serialised by :meth:`get_config`), or ``url`` (and ``api_key``,
    by default the ``MOMENTUM_API_KEY`` environment variable) to create one on first use (closed
    by :meth:`close`). ``create``: create the model (rule ``keras``, constant schedule) if it does
    not exist; with ``False`` it must exist.
    """

    def __init__(
        self,
        learning_rate: Any = 0.01,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float | None = None,
        clipnorm: float | None = None,
        clipvalue: float | None = None,
        global_clipnorm: float | None = None,
        use_ema: bool = False,
        ema_momentum: float = 0.99,
        ema_overwrite_frequency: int | None = None,
        loss_scale_factor: float | None = None,
        gradient_accumulation_steps: int | None = None,
        name: str | None = "RemoteSGD",
        *,
        model: str,
        client: Client | None = None,
        url: str | None = None,
        api_key: str | None = None,
        create: bool = True,
        **kwargs: Any,
    ) -> None:
        if gradient_accumulation_steps is not None:  # Keras 3.0 does not know the argument
            kwargs["gradient_accumulation_steps"] = gradient_accumulation_steps
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            **kwargs,
        )
        # keras.optimizers.SGD's check and message.
        if not isinstance(momentum, float) or momentum < 0 or momentum > 1:
            raise ValueError("`momentum` must be a float between [0, 1].")
        if not isinstance(nesterov, bool):
            raise ValueError(f"`nesterov` must be a bool. Received: nesterov={nesterov!r}")
        if weight_decay is not None and (
            isinstance(weight_decay, bool)
            or not isinstance(weight_decay, (int, float))
            or not np.isfinite(weight_decay)
            or weight_decay < 0
        ):
            raise ValueError(
                f"`weight_decay` must be None or a finite number >= 0. Received: weight_decay={weight_decay!r}"
            )
        if use_ema:
            raise ValueError(
                "RemoteSGD does not support use_ema=True: the model's values live on the server, "
                "and a local moving average written into the variables would not reach it"
            )
        if gradient_accumulation_steps:
            raise ValueError(
                "RemoteSGD does not support gradient_accumulation_steps: accumulate the gradients "
                "yourself and call apply_gradients once per accumulated step"
            )
        if not isinstance(model, str) or not model:
            raise ValueError(f"`model` must be the model's name on the server. Received: model={model!r}")
        if not isinstance(create, bool):
            raise ValueError(f"`create` must be a bool. Received: create={create!r}")
        check_server_arguments(client, url, api_key)
        self.momentum = momentum
        self.nesterov = nesterov
        self.model = model
        self.url = client.base_url if client is not None else url
        self.create = create
        self._api_key = api_key
        self._client = client
        self._owns_client = False
        self._names: tuple[str, ...] = ()
        self._connected = False
        self._server_lr: float | None = None

    # --- Keras' optimizer interface -----------------------------------------------------------

    def build(self, variables: Sequence[Any]) -> None:
        """Check the variables can be trained remotely and give each its parameter name (no request)."""
        if self.built:
            return
        super().build(variables)
        names: dict[str, str] = {}
        for variable in variables:
            path = getattr(variable, "path", None) or variable.name
            name = path.replace("/", ".")
            if not _PARAM_NAME.fullmatch(name):
                raise ValueError(
                    f"variable {path!r} would be the parameter {name!r}, which the server does not accept "
                    "(letters, digits and _ . : - only, up to 256 characters): rename its layer"
                )
            if name in names:
                raise ValueError(
                    f"variables {names[name]!r} and {path!r} would both be the parameter {name!r}: "
                    "give their layers distinct names"
                )
            names[name] = path
            dtype = keras.backend.standardize_dtype(variable.dtype)
            if dtype not in ("float32", "float64"):
                raise ValueError(f"variable {path!r} is {dtype}; the server keeps float32 and float64 parameters")
            if getattr(variable, "constraint", None) is not None:
                raise ValueError(
                    f"variable {path!r} has a constraint, which RemoteSGD cannot apply: the server would "
                    "keep the unconstrained value"
                )
            if self.weight_decay and not self._use_weight_decay(variable):
                raise ValueError(
                    f"variable {path!r} is excluded from weight decay; the server decays every parameter "
                    "of a model: use weight_decay=None, or no exclusions"
                )
        self._names = tuple(names)

    def update_step(self, gradient: Any, variable: Any, learning_rate: Any) -> None:
        raise RuntimeError("RemoteSGD applies its updates on the server; use apply() or apply_gradients()")

    def apply(self, grads: Sequence[Any], trainable_variables: Iterable[Any] | None = None) -> None:
        """One step: clip, send every gradient in one request, assign the server's values into the variables.

        ``apply_gradients(zip(grads, variables))`` and the torch trainer's ``fit`` both come here.
        """
        if len(grads) == 0:
            return
        if trainable_variables is None:
            if not self.built:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be built on a list "
                    "of variables. Call `optimizer.build(trainable_variables)` first."
                )
            variables = list(self._trainable_variables)
            if len(grads) != len(variables):
                raise ValueError(
                    f"Received a list of {len(grads)} gradients, but the optimizer is tracking "
                    f"{len(variables)} trainable variables."
                )
        else:
            variables = list(trainable_variables)
            if not self.built:
                with keras.name_scope(self.name, caller=self):
                    self.build(variables)
            self._check_variables_are_known(variables)
        pairs = [(g, v) for g, v in zip(grads, variables, strict=True) if g is not None]
        if not pairs:
            raise ValueError("No gradients provided for any variable.")
        if len(pairs) < len(variables):
            missing = [v.path for g, v in zip(grads, variables, strict=True) if g is None]
            warnings.warn(
                f"Gradients do not exist for variables {missing} when minimizing the loss. If using "
                "`model.compile()`, did you forget to provide a `loss` argument?",
                stacklevel=2,
            )
        # Variables that take their gradient as their new value (float8 scales) are Keras-local.
        local = [(g, v) for g, v in pairs if getattr(v, "overwrite_with_gradient", False)]
        for g, v in local:
            v.assign(g)
        pairs = [(g, v) for g, v in pairs if not getattr(v, "overwrite_with_gradient", False)]
        if pairs:
            self._remote_step([g for g, _ in pairs], [v for _, v in pairs])
        self.iterations.assign_add(1)  # a Variable (no gradient accumulation)

    def get_config(self) -> dict[str, Any]:
        """Keras' SGD settings plus ``model``, ``url`` and ``create`` (not the client, nor the API key)."""
        config: dict[str, Any] = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "model": self.model,
                "url": self.url,
                "create": self.create,
            }
        )
        return config

    # --- the server ---------------------------------------------------------------------------

    @property
    def client(self) -> Client:
        """The client: the one passed in, or one created for ``url`` on first use."""
        if self._client is None:
            assert self.url is not None  # __init__ requires client or url
            self._client = Client(self.url, api_key=self._api_key)
            self._owns_client = True
        return self._client

    def close(self) -> None:
        """Close the client if this optimizer created it (a client passed in stays open)."""
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None
            self._owns_client = False

    def connect(self, variables: Iterable[Any] | None = None) -> None:
        """Join the model on the server now rather than at the first step.

        Builds the optimizer on ``variables`` if needed, creates the model if it is missing
        (``create=True``), uploads the values of the parameters the server does not have, and
        assigns the server's values into the variables (two or three requests: the model, the
        upload of missing parameters, the download of those this worker did not create).

        Raises ``ValueError`` if the model's rule is not ``keras``, if it has a server-side lr
        schedule or is not in async mode, if it has parameters but not all of these variables'
        (other variable paths), or if a parameter's shape or dtype differs from its variable's.
        """
        if not self.built:
            if variables is None:
                raise ValueError(
                    "connect() before the first step needs the variables: connect(model.trainable_variables)"
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(variables))
        client = self.client
        if self.create:
            info = client.create_model(
                self.model,
                lr=self._wanted_lr(),
                momentum=self.momentum,
                nesterov=self.nesterov,
                weight_decay=float(self.weight_decay or 0.0),
                rule="keras",
                exist_ok=True,
            )
        else:
            info = client.get_model(self.model)
        if info.optimizer.rule != "keras":
            raise ValueError(
                f"model {self.model!r} uses the rule {info.optimizer.rule!r}; RemoteSGD needs the rule 'keras'"
            )
        if info.mode != "async":
            raise ValueError(f"model {self.model!r} is in {info.mode!r} mode; RemoteSGD sends plain steps (async mode)")
        if info.schedule.get("type") != "constant":
            raise ValueError(
                f"model {self.model!r} has the lr schedule {dict(info.schedule)}; RemoteSGD sets the lr itself "
                "(give the optimizer a keras LearningRateSchedule instead)"
            )
        variables_by_name = dict(zip(self._names, self._trainable_variables, strict=True))
        unknown = [n for n in self._names if n not in info.params]
        if info.params and unknown:
            # Every worker uploads all its parameters in one request: a model that has parameters
            # but not these was made by a model whose variables have other paths.
            raise ValueError(
                f"model {self.model!r} has parameters, but not {unknown[:3]}{' ...' if len(unknown) > 3 else ''} "
                f"(it has {sorted(info.params)[:3]}{' ...' if len(info.params) > 3 else ''}): the variables' "
                "paths differ from those of the model that created it. Keras names a variable by where it was "
                "built: a model loaded with keras.models.load_model() names them differently from the model "
                "that was saved; build the model in code (and load_weights()) or use another model name"
            )
        for name, param in info.params.items():
            variable = variables_by_name.get(name)
            if variable is None:
                continue
            shape, dtype = tuple(variable.shape), keras.backend.standardize_dtype(variable.dtype)
            if (tuple(param.shape), param.dtype) != (shape, dtype):
                raise ValueError(
                    f"parameter {name!r} of model {self.model!r} is {param.dtype}{list(param.shape)} on the "
                    f"server, the variable {variable.path!r} is {dtype}{list(shape)}"
                )
        missing = {n: _to_numpy(v) for n, v in variables_by_name.items() if n not in info.params}
        created = client.init_params(self.model, missing, exist_ok=True) if missing else {}
        adopt = [n for n in self._names if not created.get(n, False)]
        if adopt:
            values = client.get_params(self.model, adopt)
            for name in adopt:
                variables_by_name[name].assign(_writable(values[name]))
        self._server_lr = info.optimizer.lr
        self._connected = True

    def _wanted_lr(self) -> float:
        return _wire_lr(self.learning_rate)

    def _remote_step(self, grads: list[Any], variables: list[Any]) -> None:
        if not self._connected:
            self.connect()
        client = self.client
        if self.loss_scale_factor is not None:
            grads = [g / self.loss_scale_factor for g in grads]
        grads = self._clip_gradients(grads)
        lr = self._wanted_lr()
        if self._server_lr is None or np.float32(lr) != np.float32(self._server_lr):
            self._server_lr = client.update_model(self.model, lr=lr).optimizer.lr
        names = {self._var_key(v): n for n, v in zip(self._names, self._trainable_variables, strict=True)}
        payload = {
            names[self._var_key(v)]: _to_numpy(g, keras.backend.standardize_dtype(v.dtype))
            for g, v in zip(grads, variables, strict=True)
        }
        results = client.step_results(self.model, payload)
        for v in variables:
            result = results[names[self._var_key(v)]]
            assert result.value is not None  # return_params=True
            v.assign(_writable(result.value))
            self._server_lr = result.lr


def _writable(array: npt.NDArray[Any]) -> npt.NDArray[Any]:
    # torch.as_tensor warns about (and would share) a read-only array.
    return array if array.flags.writeable else array.copy()
