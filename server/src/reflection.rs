//! gRPC server reflection, `grpc.reflection.v1` and `grpc.reflection.v1alpha`
//! (Python's grpcio-reflection, older grpcurl, Postman and Evans speak only
//! v1alpha).
//!
//! tonic-reflection ends the whole stream with NOT_FOUND when one lookup
//! fails; the reflection protocol answers a failed lookup in band with an
//! `ErrorResponse` and keeps the stream open for the next request, so niix
//! serves its own index. Files are published under their canonical names
//! (the health service's as `grpc/health/v1/health.proto`), and a file is
//! sent with the files it imports.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorProto, FileDescriptorSet};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tonic_reflection::pb::{v1, v1alpha};

use v1::server_reflection_request::MessageRequest;
use v1::server_reflection_response::MessageResponse;

/// The canonical file name of the gRPC health protocol, which tonic-health's
/// descriptor set calls `health.proto`.
pub const HEALTH_PROTO: &str = "grpc/health/v1/health.proto";

/// Every file, symbol and service the server describes.
#[derive(Debug, Default)]
pub struct Reflection {
    /// File name to its descriptor.
    files: HashMap<String, FileDescriptorProto>,
    /// Fully qualified symbol (service, method, message, enum) to its file.
    symbols: HashMap<String, String>,
    /// Fully qualified service names, sorted.
    services: Vec<String>,
}

/// The streams both reflection services answer with.
type Answers<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl Reflection {
    /// Indexes encoded `FileDescriptorSet`s; a file named twice keeps its
    /// first descriptor.
    pub fn new(sets: &[&[u8]]) -> Result<Self, prost::DecodeError> {
        let mut index = Reflection::default();
        for set in sets {
            for mut file in FileDescriptorSet::decode(*set)?.file {
                if file.package() == "grpc.health.v1" && file.name() == "health.proto" {
                    file.name = Some(HEALTH_PROTO.into());
                }
                index.add(file);
            }
        }
        index.services.sort();
        Ok(index)
    }

    /// The server's index: niix.v1, health, both reflection protocols and the
    /// Open Inference Protocol.
    pub fn niix() -> Result<Self, prost::DecodeError> {
        Reflection::new(&[
            niix_proto::v1::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            v1::FILE_DESCRIPTOR_SET,
            v1alpha::FILE_DESCRIPTOR_SET,
            niix_proto::oip::FILE_DESCRIPTOR_SET,
        ])
    }

    fn add(&mut self, file: FileDescriptorProto) {
        let name = file.name().to_string();
        if self.files.contains_key(&name) {
            return;
        }
        let package = file.package();
        let qualify = |n: &str| if package.is_empty() { n.to_string() } else { format!("{package}.{n}") };
        for s in &file.service {
            let service = qualify(s.name());
            for m in &s.method {
                self.symbols.insert(format!("{service}.{}", m.name()), name.clone());
            }
            self.symbols.insert(service.clone(), name.clone());
            self.services.push(service);
        }
        for e in &file.enum_type {
            self.symbols.insert(qualify(e.name()), name.clone());
        }
        let mut messages: Vec<(String, &DescriptorProto)> =
            file.message_type.iter().map(|m| (qualify(m.name()), m)).collect();
        while let Some((full, m)) = messages.pop() {
            for e in &m.enum_type {
                self.symbols.insert(format!("{full}.{}", e.name()), name.clone());
            }
            messages.extend(m.nested_type.iter().map(|n| (format!("{full}.{}", n.name()), n)));
            self.symbols.insert(full, name.clone());
        }
        self.files.insert(name, file);
    }

    /// `name` and every file it imports, transitively, `name` first.
    fn file_with_imports(&self, name: &str) -> Option<Vec<Vec<u8>>> {
        self.files.get(name)?;
        let (mut out, mut seen, mut todo) = (Vec::new(), HashSet::new(), vec![name.to_string()]);
        while let Some(n) = todo.pop() {
            if !seen.insert(n.clone()) {
                continue;
            }
            if let Some(f) = self.files.get(&n) {
                out.push(f.encode_to_vec());
                todo.extend(f.dependency.iter().cloned());
            }
        }
        Some(out)
    }

    /// The answer to one request; a failed lookup is an in-band error.
    fn answer(&self, request: v1::ServerReflectionRequest) -> v1::ServerReflectionResponse {
        let not_found = |what: String| {
            MessageResponse::ErrorResponse(v1::ErrorResponse {
                error_code: tonic::Code::NotFound as i32,
                error_message: what,
            })
        };
        let files = |protos| {
            MessageResponse::FileDescriptorResponse(v1::FileDescriptorResponse { file_descriptor_proto: protos })
        };
        let answer = match &request.message_request {
            Some(MessageRequest::FileByFilename(name)) => match self.file_with_imports(name) {
                Some(protos) => files(protos),
                None => not_found(format!("no file {name:?}: list the services to find their files")),
            },
            Some(MessageRequest::FileContainingSymbol(symbol)) => {
                match self.symbols.get(symbol.trim_start_matches('.')).and_then(|f| self.file_with_imports(f)) {
                    Some(protos) => files(protos),
                    None => not_found(format!("no symbol {symbol:?}: list the services to see what is served")),
                }
            }
            Some(MessageRequest::FileContainingExtension(e)) => not_found(format!(
                "no extension {} of {:?}: niix defines no extensions",
                e.extension_number, e.containing_type
            )),
            Some(MessageRequest::AllExtensionNumbersOfType(t)) => {
                MessageResponse::AllExtensionNumbersResponse(v1::ExtensionNumberResponse {
                    base_type_name: t.clone(),
                    extension_number: Vec::new(),
                })
            }
            Some(MessageRequest::ListServices(_)) => MessageResponse::ListServicesResponse(v1::ListServiceResponse {
                service: self.services.iter().map(|s| v1::ServiceResponse { name: s.clone() }).collect(),
            }),
            None => MessageResponse::ErrorResponse(v1::ErrorResponse {
                error_code: tonic::Code::InvalidArgument as i32,
                error_message: "the request names no lookup (file_by_filename, file_containing_symbol, ...)".into(),
            }),
        };
        v1::ServerReflectionResponse {
            valid_host: request.host.clone(),
            message_response: Some(answer),
            original_request: Some(request),
        }
    }
}

/// The `grpc.reflection.v1` service.
#[derive(Debug, Clone)]
pub struct ReflectionV1(pub Arc<Reflection>);

#[tonic::async_trait]
impl v1::server_reflection_server::ServerReflection for ReflectionV1 {
    type ServerReflectionInfoStream = Answers<v1::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        let index = self.0.clone();
        let answers = request.into_inner().map_while(move |r| r.ok().map(|r| Ok(index.answer(r))));
        Ok(Response::new(Box::pin(answers)))
    }
}

/// The `grpc.reflection.v1alpha` service: the same messages as v1 under
/// another package, so requests and answers cross as v1 wire bytes.
#[derive(Debug, Clone)]
pub struct ReflectionV1alpha(pub Arc<Reflection>);

#[tonic::async_trait]
impl v1alpha::server_reflection_server::ServerReflection for ReflectionV1alpha {
    type ServerReflectionInfoStream = Answers<v1alpha::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        let index = self.0.clone();
        let answers = request.into_inner().map_while(move |r| {
            let r = r.ok()?;
            let answer = v1::ServerReflectionRequest::decode(r.encode_to_vec().as_slice())
                .map(|r| index.answer(r).encode_to_vec())
                .and_then(|a| v1alpha::ServerReflectionResponse::decode(a.as_slice()))
                .map_err(|e| Status::internal(format!("reflection message did not convert: {e}")));
            Some(answer)
        });
        Ok(Response::new(Box::pin(answers)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(index: &Reflection, request: MessageRequest) -> MessageResponse {
        let request = v1::ServerReflectionRequest { host: String::new(), message_request: Some(request) };
        index.answer(request).message_response.unwrap()
    }

    #[test]
    fn an_unknown_symbol_is_answered_in_band() {
        let index = Reflection::niix().unwrap();
        match ask(&index, MessageRequest::FileContainingSymbol("niix.v1.Nope".into())) {
            MessageResponse::ErrorResponse(e) => assert_eq!(e.error_code, tonic::Code::NotFound as i32),
            other => panic!("{other:?}"),
        }
        match ask(&index, MessageRequest::FileContainingSymbol("niix.v1.ScanIngest.PushScan".into())) {
            MessageResponse::FileDescriptorResponse(f) => {
                let first = FileDescriptorProto::decode(f.file_descriptor_proto[0].as_slice()).unwrap();
                assert_eq!(first.name(), "niix/v1/ingest.proto");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn health_is_published_under_its_canonical_name() {
        let index = Reflection::niix().unwrap();
        match ask(&index, MessageRequest::FileContainingSymbol("grpc.health.v1.Health".into())) {
            MessageResponse::FileDescriptorResponse(f) => {
                let file = FileDescriptorProto::decode(f.file_descriptor_proto[0].as_slice()).unwrap();
                assert_eq!(file.name(), HEALTH_PROTO);
            }
            other => panic!("{other:?}"),
        }
        assert!(index.services.iter().any(|s| s == "grpc.reflection.v1alpha.ServerReflection"));
    }
}
