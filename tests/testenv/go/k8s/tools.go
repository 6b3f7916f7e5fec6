//go:build tools

// Package tools pins the Kubernetes commands the ShCR test environment builds
// (kube-apiserver, kube-controller-manager, kubectl) to this module's versions.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
