//! Running a module with the reference interpreter behind the runtime's model interface.

use std::collections::HashMap;

use wcc_ir::interp::{Interpreter, Tensor, WeightLoader};
use wcc_ir::{DType, Module};
use wcc_runtime::decode::Decoder;
use wcc_runtime::transcribe::WhisperModel;

/// An interpreted Whisper model. Values cross between graphs by name: decoder inputs are
/// fed from the encoder outputs of the same name, and each decoder output `X.next` becomes
/// input `X` of the next step (the self-attention caches).
pub struct InterpretedModel<'m> {
    interp: Interpreter<'m>,
    input_shape: (usize, usize),
    encoder_out: HashMap<String, Tensor>,
    state: HashMap<String, Tensor>,
    logits: Vec<f32>,
}

impl<'m> InterpretedModel<'m> {
    pub fn new(module: &'m Module, weights: &dyn WeightLoader) -> Result<Self, String> {
        let enc = module.graph("encoder").ok_or("the module has no `encoder` graph")?;
        module.graph("decoder_step").ok_or("the module has no `decoder_step` graph")?;
        let mel = enc.ty(*enc.inputs.first().ok_or("the encoder has no input")?);
        if mel.rank() != 2 {
            return Err(format!("the encoder input is {mel}, expected [n_mels, frames]"));
        }
        let input_shape = (mel.shape[0], mel.shape[1]);
        let interp = Interpreter::new(module, weights).map_err(|e| e.to_string())?;
        Ok(InterpretedModel { interp, input_shape, encoder_out: HashMap::new(), state: HashMap::new(), logits: vec![] })
    }

    /// The encoder's outputs after the last [`WhisperModel::encode`], by name.
    pub fn encoder_outputs(&self) -> &HashMap<String, Tensor> {
        &self.encoder_out
    }
}

impl WhisperModel for InterpretedModel<'_> {
    /// The interpreter runs the graphs without the alignment output (`--word-timestamps`
    /// needs a compiled model).
    fn alignment(&self, _out: &mut Vec<f32>) -> Option<(usize, usize)> {
        None
    }

    fn input_shape(&self) -> (usize, usize) {
        self.input_shape
    }

    fn encode(&mut self, mel: &[f32]) -> Result<(), String> {
        let module = self.interp.module();
        let enc = module.graph("encoder").expect("checked in new");
        let input = Tensor::f32([self.input_shape.0, self.input_shape.1], mel.to_vec());
        let outs = self.interp.run("encoder", &[input]).map_err(|e| e.to_string())?;
        self.encoder_out = enc.outputs.iter().map(|&o| enc.value(o).name.clone()).zip(outs).collect();
        // A new window starts a new sequence: empty caches.
        self.state.clear();
        Ok(())
    }
}

impl Decoder for InterpretedModel<'_> {
    fn step(&mut self, token: u32, position: usize) -> Result<&[f32], String> {
        let module = self.interp.module();
        let dec = module.graph("decoder_step").expect("checked in new");
        let mut inputs = Vec::with_capacity(dec.inputs.len());
        for &i in &dec.inputs {
            let v = dec.value(i);
            let t = match v.name.as_str() {
                "tokens" => Tensor::i32([1], vec![token as i32]),
                "position" => Tensor::i32([1], vec![position as i32]),
                name => match (self.encoder_out.get(name), self.state.remove(name)) {
                    (Some(t), _) => t.clone(),
                    (None, Some(t)) => t,
                    (None, None) if v.ty.dtype == DType::F32 => Tensor::zeros(v.ty.shape.clone()),
                    (None, None) => return Err(format!("nothing feeds decoder input %{name}")),
                },
            };
            inputs.push(t);
        }
        let outs = self.interp.run("decoder_step", &inputs).map_err(|e| e.to_string())?;
        let mut logits = None;
        for (&o, t) in dec.outputs.iter().zip(outs) {
            let name = &dec.value(o).name;
            match name.strip_suffix(".next") {
                Some(state) => {
                    self.state.insert(state.to_string(), t);
                }
                None if name == "logits" => logits = Some(t.into_f32().map_err(|e| e.to_string())?),
                None => {}
            }
        }
        self.logits = logits.ok_or("the decoder has no `logits` output")?;
        Ok(&self.logits)
    }
}
