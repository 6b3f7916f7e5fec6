//! Certificates and keys for a throwaway control plane.
//!
//! One CA signs the apiserver's serving certificate (127.0.0.1, localhost and the in-cluster
//! names) and an admin client certificate in `system:masters`. The service-account signing key
//! is a separate P-256 key. Everything is generated per environment and never leaves its dir.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};

use crate::TestEnvError;

/// PEM files written for the control plane.
pub struct ControlPlanePki {
    pub ca_cert: PathBuf,
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
    pub ca_cert_pem: String,
    pub service_account_key: PathBuf,
    pub service_account_public_key: PathBuf,
}

fn pki_err(what: &str, e: rcgen::Error) -> TestEnvError {
    TestEnvError::Io(format!("generating {what}: {e}"))
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<PathBuf, TestEnvError> {
    let path = dir.join(name);
    fs::write(&path, contents)
        .map_err(|e| TestEnvError::Io(format!("writing {}: {e}", path.display())))?;
    Ok(path)
}

impl ControlPlanePki {
    pub fn generate(dir: &Path) -> Result<Self, TestEnvError> {
        let ca_key = KeyPair::generate().map_err(|e| pki_err("the CA key", e))?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| pki_err("the CA params", e))?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let mut ca_dn = DistinguishedName::new();
        ca_dn.push(DnType::CommonName, "shcr-testenv-ca");
        ca_params.distinguished_name = ca_dn;
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key)
            .map_err(|e| pki_err("the CA certificate", e))?;

        let serving_key = KeyPair::generate().map_err(|e| pki_err("the serving key", e))?;
        let mut serving = CertificateParams::new(vec![
            "localhost".to_string(),
            "kubernetes".to_string(),
            "kubernetes.default".to_string(),
            "kubernetes.default.svc".to_string(),
            "kubernetes.default.svc.cluster.local".to_string(),
        ])
        .map_err(|e| pki_err("the serving params", e))?;
        serving
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        serving
            .subject_alt_names
            .push(SanType::IpAddress([10, 0, 0, 1].into()));
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let mut serving_dn = DistinguishedName::new();
        serving_dn.push(DnType::CommonName, "kube-apiserver");
        serving.distinguished_name = serving_dn;
        let serving_cert = serving
            .signed_by(&serving_key, &ca)
            .map_err(|e| pki_err("the serving certificate", e))?;

        let admin_key = KeyPair::generate().map_err(|e| pki_err("the admin key", e))?;
        let mut admin = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| pki_err("the admin params", e))?;
        let mut admin_dn = DistinguishedName::new();
        admin_dn.push(DnType::CommonName, "shcr-testenv-admin");
        admin_dn.push(DnType::OrganizationName, "system:masters");
        admin.distinguished_name = admin_dn;
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_cert = admin
            .signed_by(&admin_key, &ca)
            .map_err(|e| pki_err("the admin certificate", e))?;

        let sa_key = KeyPair::generate().map_err(|e| pki_err("the service-account key", e))?;

        Ok(Self {
            ca_cert: write(dir, "ca.crt", &ca.pem())?,
            serving_cert: write(dir, "apiserver.crt", &serving_cert.pem())?,
            serving_key: write(dir, "apiserver.key", &serving_key.serialize_pem())?,
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
            ca_cert_pem: ca.pem(),
            service_account_key: write(dir, "sa.key", &sa_key.serialize_pem())?,
            service_account_public_key: write(dir, "sa.pub", &sa_key.public_key_pem())?,
        })
    }
}
