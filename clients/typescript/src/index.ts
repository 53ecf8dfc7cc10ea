export * from "./errors.js";
export * from "./tensors.js";
export { Client, VERSION } from "./client.js";
export type {
  CallOptions,
  ClientOptions,
  CreateModelOptions,
  Durability,
  Hyperparameters,
  ModelConfig,
  ModelInfo,
  ModelSummary,
  ModelUpdate,
  ParamState,
  StepOptions,
  StepResult,
  Wire,
} from "./client.js";
