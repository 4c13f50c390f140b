//! Where a credential came from: a leaf every other credential module names (errors list the
//! sources tried; the chain orders them). Logged by name, never with a value.

/// Where a credential came from; logged by name, never with the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    ImageCreds,
    CriPullSecret,
    SourceImageCreds,
    BuildRegistryCreds,
    MintedBuildRegistryToken,
    /// A kubelet credential provider plugin (`[registry] credential_provider_config`).
    CredentialProvider,
    /// A pull secret from the Kubernetes API (`[kubernetes] secret_keychain`).
    KubernetesSecret,
    DockerConfig,
    Anonymous,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Self::ImageCreds => "image credentials (clip.image-creds)",
            Self::CriPullSecret => "kubelet pull secret (CRI image service proxy)",
            Self::SourceImageCreds => "source image credentials (clip.source-image-creds)",
            Self::BuildRegistryCreds => "build registry credentials (clip.build-registry-creds)",
            Self::MintedBuildRegistryToken => "build registry token minted from the config",
            Self::CredentialProvider => "kubelet credential provider plugin",
            Self::KubernetesSecret => "Kubernetes pull secret (secret keychain)",
            Self::DockerConfig => "docker config.json",
            Self::Anonymous => "anonymous",
        }
    }

    /// The name a chosen source is logged as.
    pub fn decision(self) -> &'static str {
        match self {
            Self::ImageCreds => "credentials provided for runtime CLIP layer mounting",
            Self::CriPullSecret => "using the pull secret kubelet passed to PullImage",
            Self::SourceImageCreds => "using source image credentials for the image's registry",
            Self::BuildRegistryCreds => {
                "using build registry credentials for image access (image was built and pushed by us)"
            }
            Self::MintedBuildRegistryToken => {
                "using a build registry token minted from the configured long-term credentials"
            }
            Self::CredentialProvider => "using credentials from a kubelet credential provider plugin",
            Self::KubernetesSecret => "using a pull secret from the Kubernetes API (secret keychain)",
            Self::DockerConfig => "using credentials from docker config.json",
            Self::Anonymous => "no credentials apply; accessing the registry anonymously",
        }
    }
}
