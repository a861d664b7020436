"""RunPod's GraphQL schema, as much of it as the runpod SDK and gpuhop's adapter use.

A real schema (graphql-core) rather than string matching, because the SDK writes every argument
inline into the query text and RunPod's Go CLI uses `$variables`: both must parse, validate and
fail the way a GraphQL server does. Fields the SDK asks for that the simulator does not model are
declared anyway and resolve to null, as a lenient real server would.
"""

from __future__ import annotations

from graphql import GraphQLSchema, build_schema

SDL = """
scalar Void

enum CloudTypeEnum { ALL SECURE COMMUNITY }
enum PodStatus { CREATED RUNNING RESTARTING EXITED PAUSED DEAD TERMINATED }
enum PodType { INTERRUPTABLE RESERVED BID BACKGROUND }

type Query {
  gpuTypes(input: GpuTypeFilter): [GpuType]
  dataCenters: [DataCenter]
  myself: User
  pod(input: PodFilter): Pod
}

type Mutation {
  podFindAndDeployOnDemand(input: PodFindAndDeployOnDemandInput): Pod
  podRentInterruptable(input: PodRentInterruptableInput!): Pod
  podStop(input: PodStopInput!): Pod
  podResume(input: PodResumeInput!): Pod
  podBidResume(input: PodBidResumeInput!): Pod
  podTerminate(input: PodTerminateInput!): Void
  createNetworkVolume(input: CreateNetworkVolumeInput!): NetworkVolume
  deleteNetworkVolume(input: DeleteNetworkVolumeInput!): Void
  updateUserSettings(input: UserSettingsInput): User
}

input GpuTypeFilter { id: String, ids: [String] }
input PodFilter { podId: String! }

input GpuLowestPriceInput {
  gpuCount: Int, minDisk: Int, minMemoryInGb: Int, minVcpuCount: Int, secureCloud: Boolean,
  compliance: [String], dataCenterId: String, globalNetwork: Boolean, countryCode: String,
  minDownload: Int, minUpload: Int, supportPublicIp: Boolean, includeAiApi: Boolean,
  allowedCudaVersions: [String], minCudaVersion: String
}

type GpuType {
  id: String
  displayName: String
  manufacturer: String
  memoryInGb: Int
  cudaCores: Int
  secureCloud: Boolean
  communityCloud: Boolean
  securePrice: Float
  communityPrice: Float
  oneMonthPrice: Float
  threeMonthPrice: Float
  sixMonthPrice: Float
  oneWeekPrice: Float
  communitySpotPrice: Float
  secureSpotPrice: Float
  maxGpuCount: Int
  maxGpuCountSecureCloud: Int
  maxGpuCountCommunityCloud: Int
  minPodGpuCount: Int
  lowestPrice(input: GpuLowestPriceInput): LowestPrice
}

type LowestPrice {
  gpuName: String
  gpuTypeId: String
  minimumBidPrice: Float
  uninterruptablePrice: Float
  minMemory: Int
  minVcpu: Int
  rentalPercentage: Float
  rentedCount: Int
  totalCount: Int
  stockStatus: String
  minDownload: Int
  minDisk: Int
  minUpload: Int
  countryCode: String
  supportPublicIp: Boolean
  compliance: [String]
  maxUnreservedGpuCount: Int
  availableGpuCounts: [Int]
}

type DataCenter {
  id: String
  name: String
  location: String
  countryCode: String
  storageSupport: Boolean
  listed: Boolean
  gpuAvailability: [GpuAvailability]
}

type GpuAvailability {
  id: String
  gpuTypeId: String
  gpuTypeDisplayName: String
  displayName: String
  stockStatus: String
  available: Boolean
}

type User {
  id: String
  pubKey: String
  email: String
  clientBalance: Float
  currentSpendPerHr: Float
  pods: [Pod]
  networkVolumes: [NetworkVolume]
}

type NetworkVolume {
  id: String
  name: String
  size: Int
  dataCenterId: String
  dataCenter: DataCenter
}

type Pod {
  id: String
  name: String
  desiredStatus: PodStatus
  lastStatusChange: String
  lastStartedAt: String
  costPerHr: Float
  adjustedCostPerHr: Float
  gpuCount: Int
  vcpuCount: Float
  memoryInGb: Float
  containerDiskInGb: Int
  volumeInGb: Float
  volumeMountPath: String
  volumeEncrypted: Boolean
  imageName: String
  dockerArgs: String
  dockerId: String
  env: [String]
  machineId: String
  podType: PodType
  port: Int
  ports: String
  uptimeSeconds: Int
  networkVolumeId: String
  networkVolume: NetworkVolume
  templateId: String
  version: Int
  locked: Boolean
  lowestBidPriceToResume: Float
  runtime: PodRuntime
  machine: PodMachineInfo
}

type PodRuntime {
  uptimeInSeconds: Int
  ports: [PodRuntimePorts]
  gpus: [PodRuntimeGpus]
  container: PodRuntimeContainer
}

type PodRuntimePorts { ip: String, isIpPublic: Boolean, privatePort: Int, publicPort: Int, type: String }
type PodRuntimeGpus { id: String, gpuUtilPercent: Int, memoryUtilPercent: Int }
type PodRuntimeContainer { cpuPercent: Int, memoryPercent: Int }

type PodMachineInfo {
  id: String
  podHostId: String
  gpuDisplayName: String
  gpuTypeId: String
  location: String
  dataCenterId: String
  secureCloud: Boolean
  maxDownloadSpeedMbps: Int
  maxUploadSpeedMbps: Int
  costPerHr: Float
}

input EnvironmentVariableInput { key: String!, value: String }

input PodFindAndDeployOnDemandInput {
  aiApiId: String, allowedCudaVersions: [String], cloudType: CloudTypeEnum,
  computeType: String, containerDiskInGb: Int, containerRegistryAuthId: String,
  countryCode: String, cudaVersion: String, dataCenterId: String, deployCost: Float,
  dockerArgs: String, env: [EnvironmentVariableInput], gpuCount: Int, gpuTypeId: String,
  gpuTypeIdList: [String], imageName: String, instanceId: String, minDisk: Int,
  minCudaVersion: String,
  minDownload: Int, minMemoryInGb: Int, minUpload: Int, minVcpuCount: Int, name: String,
  networkVolumeId: String, port: Int, ports: String, startJupyter: Boolean,
  startSsh: Boolean, stopAfter: String, supportPublicIp: Boolean, templateId: String,
  terminateAfter: String, volumeInGb: Int, volumeKey: String, volumeMountPath: String
}

input PodRentInterruptableInput {
  bidPerGpu: Float!, aiApiId: String, allowedCudaVersions: [String], cloudType: CloudTypeEnum,
  computeType: String, containerDiskInGb: Int, containerRegistryAuthId: String,
  countryCode: String, cudaVersion: String, dataCenterId: String, deployCost: Float,
  dockerArgs: String, env: [EnvironmentVariableInput], gpuCount: Int, gpuTypeId: String,
  gpuTypeIdList: [String], imageName: String, instanceId: String, minDisk: Int,
  minCudaVersion: String,
  minDownload: Int, minMemoryInGb: Int, minUpload: Int, minVcpuCount: Int, name: String,
  networkVolumeId: String, port: Int, ports: String, startJupyter: Boolean,
  startSsh: Boolean, stopAfter: String, supportPublicIp: Boolean, templateId: String,
  terminateAfter: String, volumeInGb: Int, volumeKey: String, volumeMountPath: String
}

input PodStopInput { podId: String!, incrementVersion: Boolean }
input PodResumeInput { podId: String!, gpuCount: Int, syncMachine: Boolean, computeType: String }
input PodBidResumeInput { podId: String!, bidPerGpu: Float!, gpuCount: Int }
input PodTerminateInput { podId: String! }
input CreateNetworkVolumeInput { name: String!, size: Int!, dataCenterId: String! }
input DeleteNetworkVolumeInput { id: String! }
input UserSettingsInput { pubKey: String }
"""

_SCHEMA: GraphQLSchema | None = None


def schema() -> GraphQLSchema:
    global _SCHEMA
    if _SCHEMA is None:
        _SCHEMA = build_schema(SDL)
    return _SCHEMA

